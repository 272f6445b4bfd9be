//! Runs every file in `vectors/`. Each starts with `expect: ok <kind>` or
//! `expect: error <error-kind>`, then `#` comment lines, then hex bytes.
//! Accepted vectors must also re-encode canonically.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "test code: a panic is a failed test"
)]

use std::path::Path;

use sync_protocol::codec::check_roundtrip;
use sync_protocol::decode;

fn parse(text: &str) -> (String, Vec<u8>) {
    let mut lines = text.lines();
    let expect = lines
        .next()
        .and_then(|l| l.strip_prefix("expect: "))
        .expect("first line is `expect: …`");
    let hex: String = lines
        .filter(|l| !l.starts_with('#'))
        .flat_map(|l| l.split_whitespace())
        .collect();
    assert!(hex.len().is_multiple_of(2), "odd number of hex digits");
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect();
    (expect.to_owned(), bytes)
}

#[test]
fn every_vector_decodes_as_expected() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("vectors");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let (mut ok, mut err) = (0, 0);
    for path in &files {
        let (expect, bytes) = parse(&std::fs::read_to_string(path).unwrap());
        let got = match decode(&bytes) {
            Ok(m) => {
                assert!(check_roundtrip(&bytes), "{}", path.display());
                ok += 1;
                format!("ok {}", m.kind())
            }
            Err(e) => {
                err += 1;
                format!("error {}", e.kind_name())
            }
        };
        assert_eq!(got, expect, "{}", path.display());
    }
    assert!(
        ok >= 12 && err >= 20,
        "{ok} accepted and {err} rejected vectors"
    );
}

#[test]
fn every_message_kind_and_every_rejection_has_a_vector() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("vectors");
    let expects: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| parse(&std::fs::read_to_string(e.unwrap().path()).unwrap()).0)
        .collect();
    for kind in sync_protocol::MessageKind::ALL {
        assert!(
            expects.contains(&format!("ok {kind}")),
            "no vector for {kind}"
        );
    }
    for error in [
        "bad-magic",
        "unsupported-version",
        "unknown-kind",
        "unknown-compression",
        "compression-not-allowed",
        "oversize",
        "truncated",
        "trailing-bytes",
        "length-mismatch",
        "decompression-failed",
        "decompressed-length-mismatch",
        "unknown-enum-tag",
        "invalid-nhs-number",
        "invalid-field",
        "too-many-items",
        "inconsistent",
        "malformed",
        "non-canonical",
    ] {
        assert!(
            expects.contains(&format!("error {error}")),
            "no vector for {error}"
        );
    }
}

/// The audit pushes carry records that decode (a record's layout is versioned with the
/// protocol), chained from the push's `prev_hash`; the version-4 vector carries the
/// staff-identity events, which need version 4.
#[test]
fn audit_push_vectors_carry_readable_chained_records() {
    use sync_protocol::Message;
    use sync_protocol::audit::{AuditRecord, verify_chain};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("vectors");
    let mut seen_v4 = false;
    for name in [
        "ok-push-audit",
        "ok-push-audit-zstd",
        "ok-push-audit-v4-staff-identity",
    ] {
        let (_, bytes) = parse(&std::fs::read_to_string(dir.join(format!("{name}.hex"))).unwrap());
        let Ok(Message::PushAudit(p)) = decode(&bytes) else {
            panic!("{name}: not an audit push")
        };
        assert!(
            verify_chain(&p.prev_hash, p.entries.iter()).is_ok(),
            "{name}"
        );
        let versions: Vec<u16> = p
            .entries
            .iter()
            .map(|e| {
                AuditRecord::decode(e.record.as_slice())
                    .unwrap()
                    .min_version()
            })
            .collect();
        if name.contains("v4") {
            assert!(versions.iter().all(|v| *v == 4), "{name}: {versions:?}");
            seen_v4 = true;
        } else {
            assert!(versions.iter().all(|v| *v == 1), "{name}: {versions:?}");
        }
    }
    assert!(seen_v4);
}
