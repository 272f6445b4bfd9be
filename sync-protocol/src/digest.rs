//! The allowed-set digest: how a device checks that it holds exactly what the hub
//! allows, so that no orphan record can stay on a device.

use sha2::{Digest, Sha256};

use crate::message::AllowedSetDigest;
use crate::nhs::NhsNumber;
use crate::types::{Hash32, RecordVersion};

const DOMAIN: &[u8] = b"carecache/allowed-set/v1\0";

/// Computes the digest of a set of (patient, record version) pairs: SHA-256 over the
/// domain string then, in ascending NHS number order, each number and version as u64
/// big-endian. Order of input does not matter; a patient given twice counts once (the
/// highest version wins), as it can only be held once.
pub fn allowed_set_digest(
    entries: impl IntoIterator<Item = (NhsNumber, RecordVersion)>,
) -> AllowedSetDigest {
    let mut v: Vec<(NhsNumber, RecordVersion)> = entries.into_iter().collect();
    v.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    v.dedup_by_key(|e| e.0);
    let mut h = Sha256::new();
    h.update(DOMAIN);
    for (nhs, version) in &v {
        h.update(nhs.as_u64().to_be_bytes());
        h.update(version.0.to_be_bytes());
    }
    AllowedSetDigest {
        patients: u32::try_from(v.len()).unwrap_or(u32::MAX),
        sha256: Hash32(h.finalize().into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(stem: u32) -> NhsNumber {
        (stem..)
            .find_map(NhsNumber::from_stem)
            .expect("a later stem has a check digit")
    }

    #[test]
    fn order_independent_and_version_sensitive() {
        let a = allowed_set_digest([
            (n(999_000_001), RecordVersion(1)),
            (n(999_000_020), RecordVersion(5)),
        ]);
        let b = allowed_set_digest([
            (n(999_000_020), RecordVersion(5)),
            (n(999_000_001), RecordVersion(1)),
        ]);
        assert_eq!(a, b);
        assert_eq!(a.patients, 2);
        let c = allowed_set_digest([
            (n(999_000_020), RecordVersion(6)),
            (n(999_000_001), RecordVersion(1)),
        ]);
        assert_ne!(a.sha256, c.sha256);
        let empty = allowed_set_digest([]);
        assert_eq!(empty.patients, 0);
        assert_ne!(empty.sha256, a.sha256);
    }
}
