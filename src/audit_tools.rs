//! The privacy officer's tools on the device: `carecache audit verify` (is the chain the
//! device holds intact, and does it continue from what the hub acknowledged?), `audit
//! export` (FHIR AuditEvent NDJSON, IHE BALP) and `audit tail` (one line per entry,
//! patients by NHS number only). Entries the hub has acknowledged have left the device;
//! these tools cover what it still holds, linked to the last acknowledged hash.

use std::io::Write;

use carecache_fhir::audit::{self as audit_fhir, Entry};
use sync_protocol::audit::{AuditEntry, AuditRecord};

use crate::store::{AuditHead, Store, StoreError};

/// Entries read per scan.
const SCAN: usize = 4_096;

/// What `audit verify` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verification {
    /// Every held entry opens, decodes and links; the last is the stored head.
    Intact {
        /// The last entry the hub acknowledged (the chain continues from its hash).
        acked: u64,
        /// The last entry written.
        head: u64,
        /// Entries held (acked + 1 ..= head).
        held: u64,
    },
    /// The first entry that fails, and how.
    Broken {
        /// Its sequence.
        seq: u64,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// Checks the chain the device holds: from the acknowledged head's hash, each entry in
/// sequence with no gap, each opening (AEAD) and decoding, each hash recomputed from its
/// content and the one before, the last equal to the stored head.
///
/// The daemon may be writing and uploading meanwhile (the admin channel): entries written
/// after the head was read are left for the next check, and a check that an upload
/// overtook (the hub acknowledged, and the device let go of, entries it was reading) is
/// begun again from the new acknowledged head.
pub fn verify(store: &Store) -> Result<Verification, StoreError> {
    let mut tries = 0;
    loop {
        let acked = store.audit_acked()?;
        let found = verify_from(store, acked)?;
        tries += 1;
        let overtaken = store.audit_acked()?.seq != acked.seq;
        if matches!(found, Verification::Intact { .. }) || !overtaken || tries >= 5 {
            return Ok(found);
        }
    }
}

fn verify_from(store: &Store, acked: AuditHead) -> Result<Verification, StoreError> {
    let head = store.audit_head()?;
    let mut prev = acked.hash;
    let mut expect = acked.seq.saturating_add(1);
    'scan: loop {
        let scanned = store.audit_scan(expect, SCAN)?;
        if scanned.is_empty() {
            break;
        }
        for (seq, entry) in scanned {
            if seq > head.seq {
                break 'scan;
            }
            if seq != expect {
                return Ok(Verification::Broken {
                    seq: expect,
                    why: "missing: the entry is not on the device although later ones are",
                });
            }
            let Ok(entry) = entry else {
                return Ok(Verification::Broken {
                    seq,
                    why: "cannot be opened: its sealed bytes were altered or damaged on disk",
                });
            };
            if !entry.links_from(&prev) {
                return Ok(Verification::Broken {
                    seq,
                    why: "its hash does not match its content and the entry before it: altered",
                });
            }
            if AuditRecord::decode(entry.record.as_slice()).is_err() {
                return Ok(Verification::Broken {
                    seq,
                    why: "its record does not decode",
                });
            }
            prev = entry.hash;
            expect = expect.saturating_add(1);
        }
    }
    let last = expect - 1;
    if last != head.seq {
        return Ok(Verification::Broken {
            seq: expect.min(head.seq),
            why: "missing: the chain head names a later entry than the device holds",
        });
    }
    if prev != head.hash {
        return Ok(Verification::Broken {
            seq: head.seq,
            why: "the stored chain head does not match the last entry",
        });
    }
    Ok(Verification::Intact {
        acked: acked.seq,
        head: head.seq,
        held: head.seq - acked.seq,
    })
}

/// `carecache audit verify`: exit status 0 only when the chain is intact.
pub fn verify_command(store: &Store, out: &mut dyn Write) -> anyhow::Result<()> {
    match verify(store)? {
        Verification::Intact { acked, head, held } => {
            writeln!(
                out,
                "audit chain intact: {held} entries held ({}), linked to entry {acked} acknowledged by the hub; head {head}",
                if held == 0 {
                    "none waiting".to_owned()
                } else {
                    format!("{}–{head}", acked + 1)
                }
            )?;
            Ok(())
        }
        Verification::Broken { seq, why } => {
            anyhow::bail!("audit chain broken at sequence {seq}: {why}")
        }
    }
}

/// `carecache audit export`: the held entries as FHIR AuditEvent NDJSON to `out`; the
/// count to `err`. Entries that do not open are reported and make the command fail after
/// the rest are written.
pub fn export_command(
    store: &Store,
    device: &str,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<()> {
    let mut w = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut written = 0u64;
    let mut bad = Vec::new();
    let head = store.audit_head()?.seq;
    for_each_held(
        store,
        store.audit_acked()?.seq.saturating_add(1),
        head,
        |seq, e| {
            match e.and_then(|e| decoded(&e)) {
                Ok(record) => {
                    let v = audit_fhir::audit_event(&Entry {
                        device,
                        seq,
                        record: &record,
                    });
                    serde_json::to_writer(&mut w, &v)?;
                    w.write_all(b"\n")?;
                    written += 1;
                }
                Err(_) => bad.push(seq),
            }
            Ok(())
        },
    )?;
    w.flush()?;
    drop(w);
    writeln!(err, "exported {written} audit events")?;
    if let Some(first) = bad.first() {
        anyhow::bail!(
            "{} entries could not be opened (first: sequence {first}); run `carecache audit verify`",
            bad.len()
        );
    }
    Ok(())
}

/// `carecache audit tail`: the last `n` held entries, one line each.
pub fn tail_command(
    store: &Store,
    device: &str,
    n: u64,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let acked: AuditHead = store.audit_acked()?;
    let head = store.audit_head()?;
    let from = head
        .seq
        .saturating_sub(n.saturating_sub(1))
        .max(acked.seq.saturating_add(1));
    if acked.seq > 0 && from == acked.seq.saturating_add(1) {
        writeln!(
            out,
            "(entries 1–{} were acknowledged by the hub and are no longer on this device)",
            acked.seq
        )?;
    }
    for_each_held(store, from, head.seq, |seq, e| {
        let line = match e.and_then(|e| decoded(&e)) {
            Ok(record) => audit_fhir::describe(&Entry {
                device,
                seq,
                record: &record,
            }),
            Err(_) => format!("{device}#{seq}  CANNOT BE OPENED (altered or damaged on disk)"),
        };
        writeln!(out, "{line}")
    })?;
    if head.seq == acked.seq {
        writeln!(
            out,
            "no audit entries waiting for upload (head {})",
            head.seq
        )?;
    }
    Ok(())
}

fn decoded(e: &AuditEntry) -> Result<AuditRecord, StoreError> {
    AuditRecord::decode(e.record.as_slice()).map_err(|_| StoreError::Damaged("audit"))
}

/// Calls `f` on each held entry from `from` through `until` (the head when the command
/// began: entries the running daemon writes meanwhile are not the command's).
fn for_each_held(
    store: &Store,
    from: u64,
    until: u64,
    mut f: impl FnMut(u64, Result<AuditEntry, StoreError>) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    let mut next = from;
    loop {
        let scanned = store.audit_scan(next, SCAN)?;
        let Some(last) = scanned.last().map(|(s, _)| *s) else {
            return Ok(());
        };
        for (seq, e) in scanned {
            if seq > until {
                return Ok(());
            }
            f(seq, e)?;
        }
        next = last.saturating_add(1);
    }
}
