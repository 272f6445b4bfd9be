//! Audit upload of a large backlog: a device holding 100,000 queued entries (realistic
//! access records) uploads them to a loopback hub over mutual TLS, in pushes of 4,096
//! entries, zstd-compressed, each acknowledged only once durable at the hub. Printed:
//! entries/s, bytes per entry on the wire (and uncompressed), and two baselines measured
//! in the same run — the hub's durable store of the same entries with no network or
//! device, and the device's scan (decrypt + decode) of them with no network or hub — with
//! the ratio of the upload to the slower of the two.
//!
//! Goal (issue #7): ≥ 20,000 entries/s.
//!
//! `cargo bench --bench upload` (`UPLOAD_BENCH_ENTRIES`, default 100,000).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::cast_possible_truncation,
    clippy::indexing_slicing,
    reason = "benchmark driver"
)]

mod common;
mod table;

use std::sync::Arc;
use std::time::Instant;

use carecache::clock::{Clock, SystemClock};
use carecache::config::Config;
use carecache::device::Device;
use carecache_hub::state::HubState;
use carecache_hub::testing::TestHub;
use sync_protocol::audit::{
    Access, AuditAction, AuditEntry, AuditEvent, AuditOutcome, AuditRecord, Purpose, SectionKind,
    SectionShown, Shown,
};
use sync_protocol::message::{PushAudit, View};
use sync_protocol::types::{BoundedVec, LeaseId, StaffId, Text, Timestamp};
use sync_protocol::{Compression, Message, NhsNumber};

fn record(i: u64, now: u64, patients: &[NhsNumber]) -> AuditRecord {
    let at = Timestamp::from_millis(now + i).unwrap();
    let shown = [
        (SectionKind::Demographics, SectionShown::Items(1)),
        (SectionKind::Alerts, SectionShown::Items((i % 3) as u16)),
        (SectionKind::Allergies, SectionShown::NoneRecorded),
        (
            SectionKind::Medications,
            SectionShown::Items((i % 9) as u16),
        ),
        (SectionKind::Contacts, SectionShown::Items(2)),
    ]
    .into_iter()
    .map(|(section, shown)| Shown { section, shown })
    .collect::<Vec<_>>();
    AuditRecord {
        at,
        wall: at,
        event: AuditEvent::Access(Access {
            request_id: i,
            client: Text::new("epcr-tablet").unwrap(),
            user: Some(StaffId::new(format!("P{:05}", i % 40)).unwrap()),
            role: Some(Text::new("paramedic").unwrap()),
            purpose: Some(Purpose::Treat),
            action: AuditAction::ReadSummary,
            patient: Some(patients[i as usize % patients.len()]),
            listed: BoundedVec::default(),
            lease: Some(LeaseId(7)),
            view: Some(View::Clinical),
            shown: BoundedVec::try_from(shown).unwrap(),
            withheld: 0,
            outcome: AuditOutcome::Served,
        }),
    }
}

fn main() {
    let n: u64 = std::env::var("UPLOAD_BENCH_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let tmp =
        tempfile::tempdir_in(std::env::var("CARGO_TARGET_TMPDIR").unwrap_or_else(|_| ".".into()))
            .unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let hub = TestHub::start(200, 42);
    let clock = Arc::new(SystemClock::new());
    let now = clock.wall_ms();
    hub.set_time(now);
    let patients: Vec<NhsNumber> = hub.patients.iter().map(|p| p.nhs_number()).collect();
    let (root, config_path) = common::device_dir(tmp.path(), &hub, "");
    let device = Device::open(Config::load(&config_path).unwrap(), &root, clock.clone()).unwrap();
    let id = device.enrol(&hub.token()).unwrap();
    // The enrolment entry goes first, so the backlog is exactly `n` entries.
    device.upload_audit().unwrap();

    eprintln!("queueing {n} audit entries …");
    let t = Instant::now();
    let waits: Vec<_> = (0..n)
        .map(|i| device.audit().submit(record(i, now, &patients)))
        .collect();
    for w in waits {
        w.blocking_recv().unwrap().unwrap();
    }
    let queue_secs = t.elapsed().as_secs_f64();
    let entries: Vec<AuditEntry> = device.store().audit_entries(0, usize::MAX).unwrap();
    assert_eq!(entries.len() as u64, n);
    let prev = device.store().audit_acked().unwrap().hash;

    // Wire size of one full push, plain and compressed.
    let push = |slice: &[AuditEntry], prev| {
        Message::PushAudit(
            PushAudit::new(prev, BoundedVec::try_from(slice.to_vec()).unwrap()).unwrap(),
        )
    };
    let chunk = &entries[..entries.len().min(4096)];
    let plain = sync_protocol::encode(&push(chunk, prev), Compression::None)
        .unwrap()
        .len();
    let zstd = sync_protocol::encode(&push(chunk, prev), Compression::Zstd)
        .unwrap()
        .len();

    eprintln!("baseline: the hub storing the same entries, no network …");
    let hub_alone = {
        let state = HubState::open(&tmp.path().join("baseline-hub.redb")).unwrap();
        // The same records as a chain from entry 1 (a new device's).
        let mut h = sync_protocol::types::Hash32([0; 32]);
        let chain: Vec<AuditEntry> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let r = AuditRecord::decode(e.record.as_slice()).unwrap();
                let e = AuditEntry::seal(&h, i as u64 + 1, &r).unwrap();
                h = e.hash;
                e
            })
            .collect();
        let t = Instant::now();
        let mut before = sync_protocol::types::Hash32([0; 32]);
        for c in chain.chunks(4096) {
            let Message::PushAudit(p) = push(c, before) else {
                unreachable!()
            };
            state.push_audit("baseline", &p).unwrap();
            before = c.last().unwrap().hash;
        }
        n as f64 / t.elapsed().as_secs_f64()
    };
    eprintln!("baseline: the device reading the entries, no network …");
    let device_alone = {
        let t = Instant::now();
        let mut from = 0;
        let mut read = 0;
        loop {
            let s = device.store().audit_scan(from, 4096).unwrap();
            let Some(last) = s.last().map(|(seq, _)| *seq) else {
                break;
            };
            read += s.len();
            from = last + 1;
        }
        assert_eq!(read as u64, n);
        n as f64 / t.elapsed().as_secs_f64()
    };

    eprintln!("uploading …");
    let t = Instant::now();
    let report = device.upload_audit().unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(report.entries, n);
    let head = device.store().audit_head().unwrap().seq;
    assert_eq!(hub.hub.state.verify_audit_chain(&id).unwrap(), Ok(head));
    assert_eq!(device.store().stats().unwrap().audit_entries, 0);
    let rate = n as f64 / secs;
    let floor = hub_alone.min(device_alone);

    println!();
    println!("## Audit upload ({n} entries, pushes of 4,096, loopback mutual TLS)");
    println!();
    println!("| | figure |");
    println!("|---|---|");
    println!(
        "| queueing {n} entries (group commit) | {:.2} s, {:.0} entries/s |",
        queue_secs,
        n as f64 / queue_secs
    );
    println!("| hub storing them alone (baseline) | {hub_alone:.0} entries/s |");
    println!("| device reading them alone (baseline) | {device_alone:.0} entries/s |");
    println!(
        "| **upload** | **{secs:.2} s, {rate:.0} entries/s** ({} pushes) |",
        report.pushes
    );
    println!(
        "| on the wire | {:.1} bytes/entry sent (zstd), {} bytes received in all; {:.1} bytes/entry uncompressed |",
        report.bytes_sent as f64 / n as f64,
        report.bytes_received,
        plain as f64 / chunk.len() as f64
    );
    println!(
        "| one full push | {plain} bytes plain, {zstd} bytes zstd ({:.1}×) |",
        plain as f64 / zstd as f64
    );
    println!();
    println!(
        "upload / slower baseline: {:.2}× ({rate:.0} vs {floor:.0} entries/s)",
        rate / floor
    );
    table::row(
        "audit upload to the hub",
        &format!(
            "{rate:.0} entries/s, {:.1} B/entry",
            report.bytes_sent as f64 / n as f64
        ),
        &format!("slower of hub alone / device alone {floor:.0}/s"),
        &format!("{:.2}×", rate / floor),
        "≥ 20,000/s",
        Some(rate >= 20_000.0),
    );
    println!(
        "goal ≥ 20,000 entries/s: {}",
        if rate >= 20_000.0 { "met" } else { "SHORT" }
    );
}
