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

fn carecache_env(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_carecache"));
    cmd.args(args).stdin(std::process::Stdio::null());
    cmd.env_remove("CARECACHE_PASSPHRASE")
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("CARECACHE_NEW_PASSPHRASE")
        .env_remove("CARECACHE_DATA_DIR");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn init_rekey_wipe_with_a_key_file() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let key = tmp.path().join("root.key");
    let (d, k) = (data.to_str().unwrap(), key.to_str().unwrap());

    let out = carecache_env(&["init", "--data-dir", d, "--key-file", k], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(&data).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let root = carecache::keysource::read_key_file(&key).unwrap();
    carecache::store::Store::open(&data, &root).unwrap();

    let again = carecache_env(&["init", "--data-dir", d, "--key-file", k], &[]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("already holds a carecache store"),
        "{}",
        stderr(&again)
    );

    // Rotate in place: the same path now holds a new key, and only it opens the store.
    let old = std::fs::read(&key).unwrap();
    let out = carecache_env(
        &[
            "rekey",
            "--data-dir",
            d,
            "--key-file",
            k,
            "--new-key-file",
            k,
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_ne!(std::fs::read(&key).unwrap(), old);
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let new_root = carecache::keysource::read_key_file(&key).unwrap();
    let store = carecache::store::Store::open(&data, &new_root).unwrap();
    // The rotation is in the audit log, as the last entry.
    let audit = crate::api_harness::audit_of(&store);
    assert!(
        matches!(
            audit.last().map(|(_, r)| &r.event),
            Some(sync_protocol::audit::AuditEvent::Key(
                sync_protocol::audit::KeyEvent::Rekeyed
            ))
        ),
        "{:?}",
        audit.last()
    );
    drop(store);
    assert!(carecache::store::Store::open(&data, &root).is_err());

    // A key file others can read is refused, with the fix.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = carecache_env(
        &[
            "rekey",
            "--data-dir",
            d,
            "--key-file",
            k,
            "--new-key-file",
            k,
        ],
        &[],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!("chmod 600 {k}")),
        "{}",
        stderr(&out)
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // Wipe asks first; without a terminal and without --yes it refuses and changes nothing.
    let out = carecache_env(&["wipe", "--data-dir", d], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--yes"), "{}", stderr(&out));
    assert!(data.join("keyring").exists());
    let out = carecache_env(&["wipe", "--data-dir", d, "--yes"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!data.exists());
}

#[test]
fn init_and_rekey_with_passphrases_from_the_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let d = data.to_str().unwrap();
    let cheap = ["--argon2-memory-mib", "8", "--argon2-passes", "1"];
    let mut args = vec!["init", "--data-dir", d, "--passphrase"];
    args.extend(cheap);
    let short = carecache_env(&args, &[("CARECACHE_PASSPHRASE", "too short")]);
    assert!(!short.status.success());
    assert!(stderr(&short).contains("at least 12"), "{}", stderr(&short));
    let out = carecache_env(&args, &[("CARECACHE_PASSPHRASE", "first passphrase here")]);
    assert!(out.status.success(), "{}", stderr(&out));

    let mut args = vec!["rekey", "--data-dir", d, "--passphrase", "--new-passphrase"];
    args.extend(cheap);
    let wrong = carecache_env(
        &args,
        &[
            ("CARECACHE_PASSPHRASE", "not the passphrase"),
            ("CARECACHE_NEW_PASSPHRASE", "second passphrase here"),
        ],
    );
    assert!(!wrong.status.success());
    assert!(
        stderr(&wrong).contains("does not open"),
        "{}",
        stderr(&wrong)
    );
    let out = carecache_env(
        &args,
        &[
            ("CARECACHE_PASSPHRASE", "first passphrase here"),
            ("CARECACHE_NEW_PASSPHRASE", "second passphrase here"),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    use carecache::keysource::{KeySource, Passphrase};
    let unlock = |p: &str| {
        let root =
            carecache::store::unlock(&data, &KeySource::Passphrase(Passphrase::new(p.into())))
                .unwrap();
        carecache::store::Store::open(&data, &root).is_ok()
    };
    assert!(unlock("second passphrase here"));
    assert!(!unlock("first passphrase here"));
    use sync_protocol::audit::{AuditEvent, KeyEvent};
    let key_events = |root: &carecache::crypto::RootKey| {
        let store = carecache::store::Store::open(&data, root).unwrap();
        crate::api_harness::audit_of(&store)
            .into_iter()
            .filter_map(|(_, r)| match r.event {
                AuditEvent::Key(k) => Some(k),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let second = carecache::store::unlock(
        &data,
        &KeySource::Passphrase(Passphrase::new("second passphrase here".into())),
    )
    .unwrap();
    // A passphrase for a passphrase: a rotation, the source's kind unchanged.
    assert_eq!(key_events(&second), vec![KeyEvent::Rekeyed]);
    // A passphrase for a key file: the change of source is audited as well.
    let key = tmp.path().join("root.key");
    let out = carecache_env(
        &[
            "rekey",
            "--data-dir",
            d,
            "--passphrase",
            "--new-key-file",
            key.to_str().unwrap(),
        ],
        &[("CARECACHE_PASSPHRASE", "second passphrase here")],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let root = carecache::keysource::read_key_file(&key).unwrap();
    let text = |s: &str| sync_protocol::types::Text::new(s).unwrap();
    assert_eq!(
        key_events(&root),
        vec![
            KeyEvent::Rekeyed,
            KeyEvent::Rekeyed,
            KeyEvent::KeySourceChanged {
                from: text("passphrase"),
                to: text("key-file"),
            }
        ]
    );
    // No passphrase and no terminal: a clear error rather than a hang.
    let out = carecache_env(
        &["rekey", "--data-dir", d, "--passphrase", "--new-passphrase"],
        &[],
    );
    assert!(
        stderr(&out).contains("CARECACHE_PASSPHRASE"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn init_with_a_systemd_credential() {
    let tmp = tempfile::tempdir().unwrap();
    let creds = tmp.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    let root = carecache::crypto::RootKey::random().unwrap();
    carecache::keysource::write_key_file(&creds.join("carecache-root"), &root).unwrap();
    let data = tmp.path().join("data");
    let d = data.to_str().unwrap();
    let args = ["init", "--data-dir", d, "--credential", "carecache-root"];
    let out = carecache_env(&args, &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("LoadCredential="), "{}", stderr(&out));
    let out = carecache_env(&args, &[("CREDENTIALS_DIRECTORY", creds.to_str().unwrap())]);
    assert!(out.status.success(), "{}", stderr(&out));
    carecache::store::Store::open(&data, &root).unwrap();
    let info = carecache::store::Store::lock_info(&data).unwrap();
    assert_eq!(
        info.slots[0].1,
        carecache::keysource::SourceKind::Credential
    );
}
