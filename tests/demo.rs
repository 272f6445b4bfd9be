//! `carecache demo` as a new user runs it: the process, its printed instructions, the
//! curl commands run as printed, and Ctrl-C.

use std::time::Duration;

use serde_json::Value;

use crate::device_harness::Daemon;

/// Lines of the demo's output up to and including `last`.
fn read_until(demo: &Daemon, last: &str) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let line = demo
            .wait_for("")
            .unwrap_or_else(|| panic!("demo output ended before {last:?}: {lines:#?}"));
        let done = line.contains(last);
        lines.push(line);
        if done {
            return lines;
        }
    }
}

fn run_shell(command: &str) -> String {
    let out = std::process::Command::new("sh")
        .args(["-c", command])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_printed_curl_commands_answer_as_the_readme_says_and_ctrl_c_cleans_up() {
    let demo = Daemon::run(&["demo", "--patients", "150", "--port", "0"], true);
    let lines = read_until(&demo, "Press Ctrl-C");
    let text = lines.join("\n");
    let workdir = text
        .split("working in ")
        .nth(1)
        .and_then(|t| t.lines().next())
        .unwrap()
        .trim()
        .to_owned();
    assert!(std::path::Path::new(&workdir).is_dir(), "{workdir}");
    let viewer = lines
        .iter()
        .find_map(|l| l.trim().strip_prefix("Viewer:"))
        .unwrap()
        .trim()
        .to_owned();
    let nhs = lines
        .iter()
        .find(|l| l.contains("(alerts)"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .to_owned();
    let curls: Vec<&str> = lines
        .iter()
        .map(|l| l.trim())
        .filter(|l| l.starts_with("curl "))
        .collect();
    assert_eq!(curls.len(), 3, "{text}");

    // 1. FHIR $summary: a document Bundle whose Composition has Alerts, Allergies,
    //    Medications in that order, for the patient named.
    let summary: Value = serde_json::from_str(&run_shell(curls[0])).unwrap();
    assert_eq!(summary["resourceType"], "Bundle");
    assert_eq!(summary["type"], "document");
    let composition = &summary["entry"][0]["resource"];
    assert_eq!(composition["resourceType"], "Composition");
    // LOINC: alerts 104605-1, allergies 48765-2, medications 10160-0.
    let codes: Vec<&str> = composition["section"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["code"]["coding"][0]["code"].as_str().unwrap())
        .collect();
    assert_eq!(&codes[..3], ["104605-1", "48765-2", "10160-0"], "{codes:?}");
    assert!(
        summary["entry"].as_array().unwrap().iter().any(|e| {
            e["resource"]["resourceType"] == "Patient"
                && e["resource"]["identifier"][0]["value"] == nhs.as_str()
        }),
        "the document is about {nhs}"
    );

    // 2. JSON summary: the same patient, with a high-risk alert first.
    let json: Value = serde_json::from_str(&run_shell(curls[1])).unwrap();
    assert_eq!(json["nhs_number"].as_str().unwrap().replace(' ', ""), nhs);
    assert_eq!(json["alerts"]["state"], "entries");
    assert_eq!(json["alerts"]["items"][0]["severity"], "high_risk");
    assert_eq!(json["access"]["emergency"], false);
    assert_eq!(json["freshness"]["stale"], false);

    // 3. Status: ready, synced, leases of the demo user, no token needed.
    let status: Value = serde_json::from_str(&run_shell(curls[2])).unwrap();
    assert_eq!(status["ready"], true, "{status}");
    assert!(status["last_success"].is_string(), "{status}");
    assert_eq!(status["leases"].as_array().unwrap().len(), 2, "{status}");

    // The viewer answers with its sign-in page.
    let page = run_shell(&format!("curl -s '{viewer}'"));
    assert!(page.contains("Sign in") && page.contains("Client token"));

    // Ctrl-C: everything stops, exit 0, the demo's directory is gone.
    let (status, out) = demo.stop(rustix::process::Signal::INT);
    assert!(status.success(), "{status:?}\n{out}");
    assert!(out.contains("demo stopped"), "{out}");
    assert!(
        !std::path::Path::new(&workdir).exists(),
        "{workdir} left behind"
    );
    // The port is free again.
    let addr: std::net::SocketAddr = viewer
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    assert!(
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(),
        "still listening on {addr}"
    );
}

#[test]
fn exit_after_ready_stops_by_itself() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_carecache"))
        .args([
            "demo",
            "--patients",
            "40",
            "--port",
            "0",
            "--exit-after-ready",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("carecache demo is ready"), "{text}");
    assert!(text.contains("demo stopped"), "{text}");
}

#[test]
fn bad_demo_options_are_refused_with_a_reason() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_carecache"))
        .args(["demo", "--patients", "3"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--patients must be"));
}

#[test]
fn a_busy_port_is_refused_before_any_work_with_the_fix_named() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_carecache"))
        .args(["demo", "--patients", "40", "--port", &port])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("port {port}")) && err.contains("--port"),
        "{err}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("working in"), "nothing was made: {stdout}");
}
