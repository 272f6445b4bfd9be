//! Keys and sealing.
//!
//! The hierarchy (see `docs/STORE.md`):
//!
//! ```text
//! root key (key file, systemd credential or Argon2id(passphrase); never in the data directory)
//!   └─ wraps the master key (keyring master slot; rewritten in place by `rekey`)
//!        ├─ derives the index key   → row keys: HMAC-SHA256(index key, NHS number)
//!        ├─ derives the state key   → objections, cursor, device state
//!        ├─ derives the audit key   → audit entries (never destroyed by a purge)
//!        └─ derives the wrap key    → wraps the random data keys, one per patient and per
//!                                     lease, in fixed keyring slots zeroed on purge
//! ```
//!
//! Every secret here is zeroized on drop and prints as `[redacted]`.

use std::fmt;

use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use sync_protocol::NhsNumber;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Bytes of an XChaCha20-Poly1305 nonce.
pub const NONCE_LEN: usize = 24;
/// Bytes of a Poly1305 tag.
pub const TAG_LEN: usize = 16;
/// Bytes a sealed value adds to its plaintext: nonce + tag.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// A 256-bit secret. Zeroized on drop; `Debug` never shows it.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Secret32([u8; 32]);

impl Secret32 {
    /// A fresh random secret from the operating system's generator.
    pub fn random() -> Result<Self, CryptoError> {
        let mut bytes = [0u8; 32];
        fill_random(&mut bytes)?;
        Ok(Self(bytes))
    }

    /// Takes ownership of key bytes (the caller's copy should be zeroized).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The key bytes, for wrapping and key files only.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    /// HMAC-SHA256(self, label): a subkey for one purpose.
    fn derive(&self, label: &[u8]) -> Secret32 {
        Secret32(hmac(&self.0, &[label]))
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&self.0.into())
    }
}

impl fmt::Debug for Secret32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret32([redacted])")
    }
}

/// The key that unlocks a data directory. Comes from a [`crate::keysource::KeySource`].
#[derive(Clone, Debug)]
pub struct RootKey(pub(crate) Secret32);

impl RootKey {
    /// A new random root key (for `init` and `rekey` with a key file).
    pub fn random() -> Result<Self, CryptoError> {
        Ok(Self(Secret32::random()?))
    }

    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Secret32::from_bytes(bytes))
    }
}

/// The random master key, stored only wrapped by the root key. Every other key derives
/// from it or is wrapped under a key derived from it.
#[derive(Debug)]
pub(crate) struct MasterKey(pub(crate) Secret32);

/// The keys a store works with once its master key is unwrapped.
#[derive(Debug)]
pub(crate) struct Subkeys {
    /// Keyed hash of NHS numbers into row keys.
    pub(crate) index: Secret32,
    /// Seals objections, the sync cursor and other device state.
    pub(crate) state: Secret32,
    /// Seals audit entries; no purge touches it.
    pub(crate) audit: Secret32,
    /// Wraps per-patient and per-lease data keys.
    pub(crate) wrap: Secret32,
}

impl MasterKey {
    pub(crate) fn subkeys(&self) -> Subkeys {
        Subkeys {
            index: self.0.derive(b"carecache/v1/index"),
            state: self.0.derive(b"carecache/v1/state"),
            audit: self.0.derive(b"carecache/v1/audit"),
            wrap: self.0.derive(b"carecache/v1/wrap"),
        }
    }
}

/// A row key: HMAC-SHA256(index key, NHS number) truncated to 128 bits. The same patient
/// always maps to the same row; without the index key the row reveals nothing.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RowKey(pub [u8; 16]);

impl RowKey {
    pub(crate) fn of(index: &Secret32, nhs: &NhsNumber) -> Self {
        let full = hmac(
            index.expose(),
            &[b"nhs-number", &nhs.as_u64().to_be_bytes()],
        );
        let mut out = [0u8; 16];
        out.copy_from_slice(&full[..16]);
        Self(out)
    }
}

impl fmt::Debug for RowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A keyed hash: safe to show, and useful to correlate log lines.
        write!(f, "RowKey(")?;
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

/// Sealing failed or a sealed value did not open.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    /// The value was altered, moved to another row, or sealed under another key.
    #[error("sealed value does not open: altered, moved, or under another key")]
    Unseal,
    /// The value is shorter than a nonce and a tag: truncated.
    #[error("sealed value is truncated ({0} bytes)")]
    Truncated(usize),
    /// The operating system's random generator failed.
    #[error("the system random generator failed: {0}")]
    Random(String),
    /// The plaintext was too long for the cipher (never for our record sizes).
    #[error("value too long to seal")]
    TooLong,
}

/// Fills `buf` from the operating system's random generator.
pub fn fill_random(buf: &mut [u8]) -> Result<(), CryptoError> {
    getrandom::fill(buf).map_err(|e| CryptoError::Random(e.to_string()))
}

/// Seals `plaintext` under `key`, binding `ad`. Output: nonce ‖ ciphertext ‖ tag, appended to `out`.
pub(crate) fn seal_into(
    key: &Secret32,
    ad: &[u8],
    plaintext: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), CryptoError> {
    let mut nonce = [0u8; NONCE_LEN];
    fill_random(&mut nonce)?;
    out.reserve(NONCE_LEN + plaintext.len() + TAG_LEN);
    out.extend_from_slice(&nonce);
    let start = out.len();
    out.extend_from_slice(plaintext);
    let body = out.get_mut(start..).ok_or(CryptoError::TooLong)?;
    let tag = key
        .cipher()
        .encrypt_inout_detached(&XNonce::from(nonce), ad, body.into())
        .map_err(|_| CryptoError::TooLong)?;
    out.extend_from_slice(&tag);
    Ok(())
}

/// Opens a value made by [`seal_into`]. The plaintext is zeroized when dropped.
pub(crate) fn open(
    key: &Secret32,
    ad: &[u8],
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    if sealed.len() < SEAL_OVERHEAD {
        return Err(CryptoError::Truncated(sealed.len()));
    }
    let (nonce, rest) = sealed.split_at(NONCE_LEN);
    let (body, tag) = rest.split_at(rest.len() - TAG_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| CryptoError::Unseal)?;
    let tag: [u8; TAG_LEN] = tag.try_into().map_err(|_| CryptoError::Unseal)?;
    let mut plain = Zeroizing::new(body.to_vec());
    key.cipher()
        .decrypt_inout_detached(
            &XNonce::from(nonce),
            ad,
            plain.as_mut_slice().into(),
            &tag.into(),
        )
        .map_err(|_| CryptoError::Unseal)?;
    Ok(plain)
}

fn hmac(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length; 32 bytes cannot be refused.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_roundtrip_and_ad_binding() {
        let k = Secret32::random().unwrap();
        let mut sealed = Vec::new();
        seal_into(&k, b"table/row-1", b"alerts", &mut sealed).unwrap();
        assert_eq!(sealed.len(), 6 + SEAL_OVERHEAD);
        assert_eq!(
            open(&k, b"table/row-1", &sealed).unwrap().as_slice(),
            b"alerts"
        );
        assert_eq!(open(&k, b"table/row-2", &sealed), Err(CryptoError::Unseal));
        let other = Secret32::random().unwrap();
        assert_eq!(
            open(&other, b"table/row-1", &sealed),
            Err(CryptoError::Unseal)
        );
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(open(&k, b"table/row-1", &flipped), Err(CryptoError::Unseal));
        assert_eq!(
            open(&k, b"table/row-1", &sealed[..10]),
            Err(CryptoError::Truncated(10))
        );
    }

    #[test]
    fn nonces_are_fresh() {
        let k = Secret32::random().unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        seal_into(&k, b"", b"same", &mut a).unwrap();
        seal_into(&k, b"", b"same", &mut b).unwrap();
        assert_ne!(a[..NONCE_LEN], b[..NONCE_LEN]);
        assert_ne!(a, b);
    }

    #[test]
    fn subkeys_differ_and_row_keys_are_keyed() {
        let m = MasterKey(Secret32::random().unwrap());
        let s = m.subkeys();
        let all = [&s.index, &s.state, &s.audit, &s.wrap];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a.expose(), b.expose());
            }
        }
        let nhs = NhsNumber::parse("999 000 0018").unwrap();
        let other = MasterKey(Secret32::random().unwrap()).subkeys();
        assert_eq!(RowKey::of(&s.index, &nhs), RowKey::of(&s.index, &nhs));
        assert_ne!(RowKey::of(&s.index, &nhs), RowKey::of(&other.index, &nhs));
    }

    #[test]
    fn debug_never_shows_key_bytes() {
        let k = Secret32::from_bytes([0xAB; 32]);
        let shown = format!("{k:?} {:?}", RootKey(k.clone()));
        assert!(!shown.contains("171") && !shown.to_lowercase().contains("ab, "));
        assert!(shown.contains("redacted"));
    }
}
