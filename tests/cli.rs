//! The command line, run as a real process.

use std::process::Command;

fn carecache(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_carecache"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn check_nhs_number_accepts_valid_and_formats_3_3_4() {
    let out = carecache(&["check-nhs-number", "9434765919"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "943 476 5919\n");
}

#[test]
fn check_nhs_number_rejects_without_echoing_the_input() {
    let out = carecache(&["check-nhs-number", "4123456879"]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("not a valid NHS number"), "{err}");
    assert!(
        !err.contains("4123456879"),
        "error echoes the number: {err}"
    );
}

#[test]
fn version_and_help() {
    let out = carecache(&["--version"]);
    assert!(out.status.success());
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .starts_with("carecache ")
    );
    assert!(!carecache(&[]).status.success());
}
