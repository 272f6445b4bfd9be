//! Shift start (SPEC.md §3.4): how soon a crew has the most important part of a
//! 2,000-patient caseload, and what a team's tablets starting together cost the hub.
//!
//! 1. A device (in this process, real store on disk) syncs a 2,000-patient caseload
//!    from a hub on loopback mutual TLS with a 256 KiB batch budget (a slow link's
//!    choice): the time until it holds 10 % of the caseload, every patient with alerts,
//!    and all of it. Baseline from the same run: the whole sync.
//! 2. 100 devices of one team start the same caseload at once (each a thread doing the
//!    device's hello and pulls, decoding every batch): the hub's CPU time (its own
//!    runtime threads, from /proc) with shared snapshots and without, and for one device
//!    alone. Baseline: the same 100 without shared snapshots.
//!
//! `cargo bench --bench shift` (`SHIFT_BENCH_DEVICES=20` for fewer devices).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    clippy::indexing_slicing,
    reason = "benchmark driver"
)]

mod common;
mod table;

use std::sync::{Arc, Barrier};
use std::time::Instant;

use carecache::clock::SystemClock;
use carecache::config::Config;
use carecache::device::Device;
use carecache::transport::Transport;
use carecache_hub::config::Limits;
use carecache_hub::testing::TestHub;
use sync_protocol::message::{Hello, Message, MessageKind, Pull};
use sync_protocol::record::Section;
use sync_protocol::types::{Capabilities, Text, Timestamp};

const CASELOAD: usize = 2_000;
const BUDGET: u32 = 256 * 1024;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn lease(hub: &TestHub, target: serde_json::Value) {
    let patients: Vec<String> = hub
        .patients
        .iter()
        .map(|p| p.nhs_number().digits())
        .collect();
    hub.grant(serde_json::json!({
        "label": "Shift caseload",
        "target": target,
        "view": "clinical",
        "not_before": "2026-01-01T00:00:00Z",
        "not_after": "2099-01-01T00:00:00Z",
        "max_offline_secs": 86400,
        "patients": patients,
    }));
}

/// Part 1: (ms to 10 %, ms to every patient with alerts, ms to all, share of patients
/// with alerts).
fn first_minutes() -> (f64, f64, f64, f64) {
    let hub = TestHub::start(CASELOAD, 7);
    hub.set_time(now_ms());
    let tmp = tempfile::tempdir().unwrap();
    let (root, config) = common::device_dir(
        tmp.path(),
        &hub,
        &format!("max_batch_bytes = {BUDGET}\nread_timeout_secs = 600\n"),
    );
    let device = Device::open(
        Config::load(&config).unwrap(),
        &root,
        Arc::new(SystemClock::new()),
    )
    .unwrap();
    let id = device.enrol(&hub.token()).unwrap();
    lease(&hub, serde_json::json!({ "device": id }));
    let alerted: std::collections::HashSet<_> = hub
        .patients
        .iter()
        .filter(|p| p.shareable() && matches!(p.expected.alerts, Section::Entries(_)))
        .map(|p| p.nhs_number())
        .collect();
    let started = Instant::now();
    let (mut tenth, mut alerts) = (None, None);
    device
        .sync_once(&mut |_, c| {
            let ms = started.elapsed().as_secs_f64() * 1e3;
            let expected = u64::from(c.expected.unwrap_or(u32::MAX));
            if tenth.is_none() && c.held * 10 >= expected {
                tenth = Some(ms);
            }
            if alerts.is_none() {
                let held: std::collections::HashSet<_> = device
                    .store()
                    .held_versions()
                    .unwrap()
                    .into_iter()
                    .map(|(n, _)| n)
                    .collect();
                if alerted.is_subset(&held) {
                    alerts = Some(ms);
                }
            }
        })
        .unwrap();
    let all = started.elapsed().as_secs_f64() * 1e3;
    println!(
        "first minutes, {CASELOAD} patients ({} with alerts), 256 KiB batches: 10 % after {:.0} ms, every patient with alerts after {:.0} ms, all after {all:.0} ms",
        alerted.len(),
        tenth.unwrap(),
        alerts.unwrap()
    );
    let shareable = hub.patients.iter().filter(|p| p.shareable()).count();
    (
        tenth.unwrap(),
        alerts.unwrap(),
        all,
        alerted.len() as f64 / shareable as f64,
    )
}

/// CPU milliseconds of this process's threads named `hub` (the hub's runtime).
fn hub_cpu_ms() -> f64 {
    let mut ticks = 0u64;
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let Ok(stat) = std::fs::read_to_string(task.unwrap().path().join("stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        if !head.ends_with("(hub") {
            continue;
        }
        let f: Vec<&str> = rest.split_whitespace().collect();
        // Fields 14 and 15 (utime, stime), counted from 3 after the name.
        ticks += f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    }
    ticks as f64 * 10.0 // USER_HZ is 100
}

/// An enrolled protocol client of `team`.
fn client(hub: &TestHub, team: &str) -> Transport {
    let (status, body) = hub.admin(
        "POST",
        "/admin/v1/enrolment-tokens",
        Some(serde_json::json!({ "team": team })),
    );
    assert_eq!(status, 201, "{body}");
    common::enrolled_client(hub, body["token"].as_str().unwrap()).0
}

/// A device's first sync as the wire sees it: hello, then pulls to the end. Records.
fn first_sync(t: &Transport) -> usize {
    let hello = Message::Hello(Hello {
        min_version: 1,
        max_version: sync_protocol::codec::VERSION,
        capabilities: Capabilities(1),
        device_time: Timestamp::from_millis(now_ms()).unwrap(),
        software: Text::new("bench").unwrap(),
    });
    t.exchange("/ccsp/v1/hello", &hello, MessageKind::Welcome)
        .unwrap();
    let mut cursor = None;
    let mut records = 0;
    loop {
        let a = t
            .exchange(
                "/ccsp/v1/pull",
                &Message::Pull(Pull::new(cursor.clone(), BUDGET)),
                MessageKind::Batch,
            )
            .unwrap();
        let Message::Batch(b) = a.message else {
            panic!("pull")
        };
        records += b.upserts.len();
        cursor = Some(b.next_cursor);
        if !b.more {
            return records;
        }
    }
}

/// Part 2: hub CPU ms for `devices` of one team starting at once, and the wall time.
fn team_start(devices: usize, shared: bool) -> (f64, f64) {
    let limits = Limits {
        shared_snapshot_mib: if shared { 256 } else { 0 },
        ..Limits::default()
    };
    let hub = TestHub::start_with(CASELOAD, 7, &limits);
    hub.set_time(now_ms());
    lease(&hub, serde_json::json!({ "team": "north" }));
    let clients: Vec<Transport> = (0..devices).map(|_| client(&hub, "north")).collect();
    let barrier = Arc::new(Barrier::new(devices + 1));
    let cpu = hub_cpu_ms();
    let started = Instant::now();
    let records: usize = std::thread::scope(|s| {
        let handles: Vec<_> = clients
            .iter()
            .map(|t| {
                let b = barrier.clone();
                s.spawn(move || {
                    b.wait();
                    first_sync(t)
                })
            })
            .collect();
        barrier.wait();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let wall = started.elapsed().as_secs_f64();
    let cpu = hub_cpu_ms() - cpu;
    assert_eq!(records % devices, 0, "every tablet got the same caseload");
    assert!(records / devices > CASELOAD / 2);
    println!(
        "{devices} tablets of one team, shared snapshots {}: hub CPU {cpu:.0} ms, wall {wall:.2} s, {} records each",
        if shared { "on" } else { "off" },
        records / devices
    );
    (cpu, wall)
}

fn main() {
    let devices: usize = std::env::var("SHIFT_BENCH_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let (tenth, alerts, all, share) = first_minutes();
    table::row(
        &format!("shift start: first 10 % of a {CASELOAD}-patient caseload"),
        &format!("{tenth:.0} ms"),
        &format!("whole caseload {all:.0} ms"),
        &format!("{:.2}×", tenth / all),
        "—",
        None,
    );
    // In NHS-number order the last patient with alerts comes near the end; sent first,
    // they are all held once about their share of the caseload has arrived.
    table::row(
        &format!(
            "shift start: every patient with alerts ({:.0} % of {CASELOAD})",
            share * 100.0
        ),
        &format!("{alerts:.0} ms"),
        &format!("whole caseload {all:.0} ms"),
        &format!("{:.2}×", alerts / all),
        &format!("≤ {:.2}× (their share + 0.1)", share + 0.1),
        Some(alerts / all <= share + 0.1),
    );
    let (one, _) = team_start(1, true);
    let (off, off_wall) = team_start(devices, false);
    let (on, on_wall) = team_start(devices, true);
    println!(
        "hub CPU: one tablet {one:.0} ms; {devices} tablets {off:.0} ms without shared snapshots ({off_wall:.2} s), {on:.0} ms with ({on_wall:.2} s)"
    );
    table::row(
        &format!("hub CPU, {devices} tablets of one team starting at once"),
        &format!("{on:.0} ms with shared snapshots"),
        &format!("{off:.0} ms without; one tablet {one:.0} ms"),
        &format!("{:.2}× without", on / off),
        "≤ 0.5× without",
        Some(on / off <= 0.5),
    );
}
