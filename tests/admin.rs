//! The admin channel (issue 24, point 1): every operator command against a running
//! daemon, under read load, with no failed read; each audited with the operator's user
//! id; the socket owner-only and peer credentials checked; malformed requests refused;
//! a daemon that died leaves a socket the commands see through.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use sync_protocol::audit::{AdminCommand, AuditEvent, AuditRecord, KeyEvent};

use crate::api_harness::try_raw;
use crate::device_harness::{
    Daemon, TestHub, at, cli_client_token, cli_device, grant, run_cli, shareable,
};

fn get(addr: std::net::SocketAddr, token: &str, path: &str) -> Option<crate::api_harness::Resp> {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nX-Carecache-User: n1\r\nX-Carecache-Purpose: TREAT\r\n\r\n"
    );
    try_raw(addr, req.as_bytes())
}

fn wait_synced(addr: std::net::SocketAddr, token: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(addr, token, "/status").is_none_or(|r| r.json()["last_success"].is_null()) {
        assert!(Instant::now() < deadline, "the daemon did not sync");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every record the device wrote: those the hub holds, then those on the device (opened
/// with the daemon stopped).
fn all_audit(hub: &TestHub, id: &str, dir: &Path) -> Vec<AuditRecord> {
    let root = carecache::keysource::read_key_file(&dir.join("root.key")).unwrap();
    let store = carecache::store::Store::open(&dir.join("data"), &root).unwrap();
    let head = hub.hub.state.audit_head(id).unwrap().seq;
    (1..=head)
        .map(|seq| hub.hub.state.audit_entry(id, seq).unwrap().unwrap().record)
        .chain(
            crate::api_harness::audit_of(&store)
                .into_iter()
                .map(|(_, r)| r),
        )
        .collect()
}

/// The trust's IT team works on a tablet in service: status, leases, sync, client
/// tokens, audit — all while crew software reads patients non-stop. No read fails, a
/// token issued is usable at once and one revoked is refused at once, and each command
/// is in the audit with the operator's user id.
#[test]
fn every_operator_command_runs_against_the_live_daemon_under_read_load() {
    let hub = TestHub::start(30, 240);
    let now = carecache::clock::Clock::wall_ms(&carecache::clock::SystemClock::new());
    hub.set_time(now);
    let tmp = tempfile::tempdir().unwrap();
    let (config, id) = cli_device(&hub, tmp.path(), |t| {
        t.replace("[sync]\n", "[sync]\ninterval_secs = 3600\n")
    });
    let cfg = config.to_str().unwrap();
    let patients = shareable(&hub, 12);
    grant(
        &hub,
        &id,
        &patients,
        json!({ "label": "Night shift east", "not_before": at(now - 3_600_000), "not_after": at(now + 8 * 3_600_000) }),
    );
    let token = cli_client_token(cfg);
    let daemon = Daemon::spawn(cfg);
    let addr = daemon.addr();
    wait_synced(addr, &token);
    let socket = tmp.path().join("data/admin.sock");
    let mode = std::fs::metadata(&socket).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600,
        "the admin socket is owner-only"
    );

    // Crew software reads all the while.
    let stop = Arc::new(AtomicBool::new(false));
    let (reads, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let readers: Vec<_> = (0..2)
        .map(|k| {
            let (stop, reads, failed, token) = (
                Arc::clone(&stop),
                Arc::clone(&reads),
                Arc::clone(&failed),
                token.clone(),
            );
            let patients = patients.clone();
            std::thread::spawn(move || {
                let mut i = k;
                while !stop.load(Ordering::SeqCst) {
                    let nhs = &patients[i % patients.len()];
                    match get(addr, &token, &format!("/v1/patients/{}", nhs.digits())) {
                        Some(r) if r.status == 200 => reads.fetch_add(1, Ordering::SeqCst),
                        _ => failed.fetch_add(1, Ordering::SeqCst),
                    };
                    i += 1;
                }
            })
        })
        .collect();

    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--config", cfg]);
        let (ok, out, err) = run_cli(&all);
        assert!(ok, "{args:?} against the live daemon: {out}{err}");
        (out, err)
    };
    let (out, _) = cli(&["status"]);
    assert!(out.contains(&id) && out.contains("holding"), "{out}");
    let (out, _) = cli(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["device_id"], json!(id));
    assert_eq!(status["patients_held"], json!(patients.len()));
    let (out, _) = cli(&["leases"]);
    assert!(
        out.contains("Night shift east") && out.contains("active"),
        "{out}"
    );
    let (out, _) = cli(&["leases", "--json"]);
    let leases: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(leases[0]["patients"], json!(patients.len()));
    let (out, _) = cli(&["sync"]);
    assert!(out.starts_with("synced:"), "{out}");

    // A second client: its token works at once; revoked, it is refused at once, by the
    // API and by the viewer's sign-in alike.
    let (out, _) = cli(&["clients", "add", "nurse-laptop"]);
    let second = out
        .split_whitespace()
        .find(|w| w.starts_with("cct_"))
        .unwrap()
        .to_owned();
    let path = format!("/v1/patients/{}", patients[0].digits());
    assert_eq!(get(addr, &second, &path).unwrap().status, 200);
    let cookie = crate::viewer::sign_in(addr, &second, "n2");
    assert_eq!(crate::viewer::get(addr, "/", Some(&cookie)).status, 200);
    let (out, _) = cli(&["clients", "list"]);
    assert!(
        out.contains("epcr") && out.contains("nurse-laptop"),
        "{out}"
    );
    cli(&["clients", "revoke", "nurse-laptop"]);
    assert_eq!(get(addr, &second, &path).unwrap().status, 401);
    let page = crate::viewer::get(addr, "/", Some(&cookie));
    assert_eq!(page.status, 401);
    assert!(page.text().contains("revoked"), "{}", page.text());
    let (out, _) = cli(&["clients", "list"]);
    assert!(
        out.contains("nurse-laptop") && out.contains("revoked"),
        "{out}"
    );

    let (out, _) = cli(&["audit", "verify"]);
    assert!(out.contains("audit chain intact"), "{out}");
    let (out, _) = cli(&["audit", "tail", "-n", "5"]);
    assert_eq!(out.lines().filter(|l| l.contains(&id)).count(), 5, "{out}");
    let file = tmp.path().join("export.ndjson");
    let (_, err) = cli(&["audit", "export", "--out", file.to_str().unwrap()]);
    assert!(err.contains("exported"), "{err}");
    let exported: Vec<serde_json::Value> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!exported.is_empty());
    assert!(exported.iter().all(|e| e["resourceType"] == "AuditEvent"));

    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    for r in readers {
        r.join().unwrap();
    }
    let (reads, failed) = (reads.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    assert!(reads > 20, "the readers ran: {reads}");
    assert_eq!(failed, 0, "{failed} of {} reads failed", reads + failed);

    let (status, log) = daemon.stop(rustix::process::Signal::TERM);
    assert!(status.success(), "{log}");
    assert!(!socket.exists(), "the socket is removed at a clean stop");
    for n in &patients {
        assert!(!log.contains(&n.digits()), "NHS number in the log");
    }

    // Every command in the audit, with this user's id.
    let me = rustix::process::geteuid().as_raw();
    let records = all_audit(&hub, &id, tmp.path());
    let commands: Vec<AdminCommand> = records
        .iter()
        .filter_map(|r| match r.event {
            AuditEvent::Admin {
                command,
                uid: Some(uid),
                ok: true,
            } if uid == me => Some(command),
            _ => None,
        })
        .collect();
    assert_eq!(
        commands,
        vec![
            AdminCommand::Status,
            AdminCommand::Status,
            AdminCommand::Leases,
            AdminCommand::Leases,
            AdminCommand::SyncNow,
            AdminCommand::ClientsList,
            AdminCommand::ClientsList,
            AdminCommand::AuditVerify,
            AdminCommand::AuditTail { lines: 5 },
            AdminCommand::AuditExport,
        ]
    );
    let keys = |wanted: &dyn Fn(&KeyEvent) -> bool| {
        records
            .iter()
            .filter(|r| matches!(&r.event, AuditEvent::Key(k) if wanted(k)))
            .count()
    };
    assert_eq!(
        keys(&|k| matches!(k, KeyEvent::ClientAdded { name } if name.as_str() == "nurse-laptop")),
        1
    );
    assert_eq!(
        keys(&|k| matches!(k, KeyEvent::ClientRevoked { name } if name.as_str() == "nurse-laptop")),
        1
    );
}

/// What the channel does with requests that are not commands: each refused with a
/// message, the daemon unharmed. A daemon killed outright leaves its socket behind: the
/// commands open the data directory instead, and the next daemon replaces it.
#[test]
fn malformed_requests_are_refused_and_a_stale_socket_is_seen_through() {
    let hub = TestHub::start(10, 241);
    hub.set_time(carecache::clock::Clock::wall_ms(
        &carecache::clock::SystemClock::new(),
    ));
    let tmp = tempfile::tempdir().unwrap();
    let (config, _id) = cli_device(&hub, tmp.path(), |t| t);
    let cfg = config.to_str().unwrap();
    let socket = tmp.path().join("data/admin.sock");
    let daemon = Daemon::spawn(cfg);
    daemon.wait_for("admin channel listening").unwrap();

    let ask = |bytes: &[u8], close_write: bool| -> (u8, String) {
        let mut s = UnixStream::connect(&socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let _ = s.write_all(bytes);
        if close_write {
            s.shutdown(std::net::Shutdown::Write).unwrap();
        }
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        assert!(answer.len() >= 5, "an answer frame: {answer:?}");
        let tag = answer[0];
        (tag, String::from_utf8_lossy(&answer[5..]).into_owned())
    };
    let (tag, why) = ask(b"{\"command\":\"format-disk\"}\n", false);
    assert_eq!(tag, carecache::admin::FAILED);
    assert!(why.contains("not a command this daemon knows"), "{why}");
    let (tag, why) = ask(b"not json at all\n", false);
    assert_eq!(tag, carecache::admin::FAILED, "{why}");
    let (tag, why) = ask(
        b"{\"command\":\"status\",\"json\":true,\"extra\":1}\n",
        false,
    );
    assert_eq!(
        tag,
        carecache::admin::FAILED,
        "unknown fields refused: {why}"
    );
    let (tag, why) = ask(&vec![b' '; 10_000], false);
    assert_eq!(tag, carecache::admin::FAILED);
    assert!(why.contains("longer than"), "{why}");
    let (tag, why) = ask(b"{\"command\":\"status\"", true);
    assert_eq!(tag, carecache::admin::FAILED);
    assert!(why.contains("cut short"), "{why}");
    // Still serving.
    let (ok, out, err) = run_cli(&["status", "--config", cfg]);
    assert!(ok && out.contains("holding"), "{out}{err}");

    // Killed outright: the socket stays, nobody listens; the commands open the store.
    let (status, _) = daemon.stop(rustix::process::Signal::KILL);
    assert!(!status.success());
    assert!(socket.exists(), "a killed daemon leaves its socket");
    let (ok, out, err) = run_cli(&["status", "--config", cfg]);
    assert!(ok && out.contains("holding"), "{out}{err}");
    let daemon = Daemon::spawn(cfg);
    daemon.wait_for("admin channel listening").unwrap();
    let (ok, out, err) = run_cli(&["leases", "--config", cfg]);
    assert!(ok && out.contains("no leases held"), "{out}{err}");
    let (status, log) = daemon.stop(rustix::process::Signal::TERM);
    assert!(status.success(), "{log}");
}

/// Another user cannot use the channel: the socket's mode keeps them out, and were it
/// opened up by mistake, the peer-credential check still refuses them. (Runs as root,
/// as CI does, to act as another user.)
#[test]
fn another_user_is_refused_by_mode_and_by_peer_credentials() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    assert_eq!(
        rustix::process::geteuid().as_raw(),
        0,
        "this test acts as another user, so it runs as root (as CI does)"
    );
    let hub = TestHub::start(10, 242);
    hub.set_time(carecache::clock::Clock::wall_ms(
        &carecache::clock::SystemClock::new(),
    ));
    let tmp = tempfile::tempdir().unwrap();
    // The socket in a directory others may enter, and a configuration they may read.
    let open = tmp.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = open.join("admin.sock");
    let (config, _) = cli_device(&hub, tmp.path(), |t| {
        format!("{t}[admin]\nsocket = \"{}\"\n", socket.display())
    });
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = config.to_str().unwrap();
    let daemon = Daemon::spawn(cfg);
    daemon.wait_for("admin channel listening").unwrap();
    let as_nobody = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_carecache"))
            .args(["status", "--config", cfg])
            .env_remove("CARECACHE_CONFIG")
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = as_nobody();
    assert!(!ok && out.is_empty(), "{out}");
    assert!(err.contains("refused this user"), "{err}");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (ok, out, err) = as_nobody();
    assert!(!ok && out.is_empty(), "{out}");
    assert!(
        err.contains("only the daemon's user and root may use the admin channel"),
        "{err}"
    );
    let (status, log) = daemon.stop(rustix::process::Signal::TERM);
    assert!(status.success(), "{log}");
    assert!(
        log.contains("a connection from another user refused"),
        "{log}"
    );
}
