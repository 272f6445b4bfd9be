//! What the README's deployment and API sections promise: the OpenAPI document names
//! exactly the routes the daemon answers, the example configurations load, and `serve`
//! tells systemd it is ready (`Type=notify`) and that it is stopping.

use std::time::Duration;

use carecache_hub::testing::TestHub;
use serde_json::Value;

use crate::api_harness::Served;
use crate::device_harness::{Dev, cli_device};

fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[test]
fn the_openapi_document_names_every_route_and_only_those() {
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(repo("docs/openapi.json")).unwrap()).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let hub = TestHub::start(5, 3);
    let s = Served::start(Dev::enrolled(&hub));
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 16, "{}", paths.len());
    for (path, ops) in paths {
        let concrete = path
            .replace("{id}", "9990000018")
            .replace("{nhs}", "9990000018");
        for method in ops.as_object().unwrap().keys() {
            let req = format!(
                "{} {concrete} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                method.to_uppercase()
            );
            let r = crate::api_harness::raw(s.addr, req.as_bytes());
            assert!(
                !r.text().contains("no such route") && r.status != 405,
                "{method} {path} documented but not served: {} {}",
                r.status,
                r.text()
            );
        }
    }
    // And a route that is not documented is not served.
    let r = s.get("/v1/everything");
    assert_eq!(r.status, 404);
    assert!(r.text().contains("no such route"));
}

#[test]
fn the_example_configurations_load() {
    let dir = tempfile::tempdir().unwrap();
    let device = std::fs::read_to_string(repo("deploy/carecache.example.toml")).unwrap();
    carecache::config::Config::parse(&device, &dir.path().join("carecache.toml"))
        .unwrap_or_else(|e| panic!("deploy/carecache.example.toml: {e}"));
    let hub = carecache_hub::config::Config::load(&repo("deploy/hub.example.toml"))
        .unwrap_or_else(|e| panic!("deploy/hub.example.toml: {e}"));
    assert_eq!(
        hub.sharing.unclassified,
        carecache_hub::sharing::Unclassified::Share
    );
    let map = carecache_hub::sharing::LocalCodeMap::parse(
        &std::fs::read_to_string(repo("deploy/local-code-map.example.csv")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        map.targets("https://gp-system.invalid/CodeSystem/alert-codes", "DNR"),
        &[450_476_008]
    );
    let unit = std::fs::read_to_string(repo("deploy/carecache.service")).unwrap();
    for line in [
        "Type=notify",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "LoadCredentialEncrypted=carecache-root:",
    ] {
        assert!(unit.contains(line), "unit lacks {line}");
    }
}

#[test]
fn serve_tells_systemd_when_it_is_ready_and_when_it_stops() {
    use std::os::unix::net::UnixDatagram;
    let hub = TestHub::start(10, 5);
    // A real process reads the system clock; the hub follows it.
    hub.set_time(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64,
    );
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = cli_device(&hub, dir.path(), |t| t);
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_carecache"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).unwrap();
    assert_eq!(std::str::from_utf8(&buf[..n]).unwrap().trim(), "READY=1");
    let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let n = sock.recv(&mut buf).unwrap();
    assert_eq!(std::str::from_utf8(&buf[..n]).unwrap().trim(), "STOPPING=1");
    assert!(child.wait().unwrap().success());
}

/// Every test that docs/RELIABILITY.md and the hazard log name exists: `module::name`
/// in this crate's tests, a bare name in the hub's or the protocol crate's tests.
#[test]
fn reliability_table_and_hazard_log_name_only_tests_that_exist() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut sources = String::new();
    for dir in [
        "tests",
        "src",
        "tools/hub/tests",
        "tools/hub/src",
        "fhir/src",
        "fhir/tests",
        "sync-protocol/tests",
    ] {
        for e in std::fs::read_dir(root.join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "rs") {
                sources.push_str(&std::fs::read_to_string(&p).unwrap());
            }
        }
    }
    let mut named = 0;
    for doc in ["docs/RELIABILITY.md", "docs/clinical-safety/hazard-log.md"] {
        let text = std::fs::read_to_string(root.join(doc)).unwrap();
        for quoted in text.split('`').skip(1).step_by(2) {
            let (module, name) = match quoted.split_once("::") {
                Some((m, n)) => (Some(m), n),
                None => (None, quoted),
            };
            let is_test_name = name.matches('_').count() >= 3
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !is_test_name {
                continue;
            }
            named += 1;
            let found = match module {
                Some(m) => std::fs::read_to_string(root.join(format!("tests/{m}.rs")))
                    .is_ok_and(|src| src.contains(&format!("fn {name}("))),
                None => sources.contains(&format!("fn {name}(")),
            };
            assert!(found, "{doc} names `{quoted}`, which is no test");
        }
    }
    assert!(named >= 40, "only {named} tests named");
}

fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Test-only hooks stay out of a product build: every `dangerous_*` function of the
/// device and the hub, and the fuzz harnesses, exist only with the `testing` feature
/// (which the tests and tools/fuzz turn on). And the local API holds only its views of
/// the device — no `Device`, no transport, no sync round — so the compiler keeps a read
/// from ever waiting on the hub.
#[test]
fn test_hooks_are_feature_gated_and_the_api_reaches_no_network() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    rust_files(&root.join("tools/hub/src"), &mut files);
    let mut hooks = 0;
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let hook = line.contains("fn dangerous_")
                || (line.contains("pub mod fuzzing") && f.ends_with("src/lib.rs"));
            if !hook {
                continue;
            }
            hooks += 1;
            let before = &lines[i.saturating_sub(8)..i];
            assert!(
                before
                    .iter()
                    .any(|l| l.trim() == "#[cfg(feature = \"testing\")]"),
                "{}:{}: a test hook outside the `testing` feature",
                f.display(),
                i + 1
            );
        }
    }
    assert!(hooks >= 6, "the hooks were found ({hooks})");
    let mut api = Vec::new();
    rust_files(&root.join("src/api"), &mut api);
    for f in &api {
        let text = std::fs::read_to_string(f).unwrap();
        for banned in [
            ": Arc<Device>,",
            "crate::transport",
            "sync_once",
            "crate::sync::",
        ] {
            assert!(
                !text.contains(banned),
                "{} names `{banned}`: the API sees the device through its views only",
                f.display()
            );
        }
    }
}
