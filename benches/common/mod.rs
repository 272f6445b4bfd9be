//! What the device benchmarks share.

use std::path::{Path, PathBuf};

use carecache::crypto::RootKey;
use carecache::keysource::{SourceKind, create_key_file};
use carecache::store::Store;
use carecache::transport::{Identity, Transport};
use carecache_hub::pki::make_csr;
use carecache_hub::testing::TestHub;
use sync_protocol::message::{EnrolRequest, Message, MessageKind};
use sync_protocol::types::{Bytes, EnrolmentToken, Text};
use zeroize::Zeroizing;

/// An initialised data directory with a key file in `dir`, and a `carecache.toml` for
/// `hub` there whose `[hub]` section ends with `extra` (which may open more sections).
/// Returns the root key and the config path.
#[allow(dead_code, reason = "the store benchmark runs no device")]
pub(crate) fn device_dir(dir: &Path, hub: &TestHub, extra: &str) -> (RootKey, PathBuf) {
    let root = create_key_file(&dir.join("root.key")).unwrap();
    Store::create(&dir.join("data"), &root, SourceKind::KeyFile, None).unwrap();
    let config = dir.join("carecache.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[identity]\nmode = \"asserted\"\n[key]\nsource = \"key_file\"\npath = \"{}\"\n[hub]\nurl = \"{}\"\nca_file = \"{}\"\n{extra}",
            dir.join("data").display(),
            dir.join("root.key").display(),
            hub.base_url(),
            hub.ca_file.display()
        ),
    )
    .unwrap();
    (root, config)
}

/// A protocol client enrolled with `hub` by one-time `token`: its transport (mutual TLS,
/// the hub's CA pinned) and its device id.
#[allow(dead_code, reason = "not every benchmark speaks the protocol by hand")]
pub(crate) fn enrolled_client(hub: &TestHub, token: &str) -> (Transport, String) {
    let timeouts = (
        std::time::Duration::from_secs(5),
        std::time::Duration::from_secs(600),
    );
    let (key_pem, csr) = make_csr("bench client").unwrap();
    let anon = Transport::new(&hub.base_url(), &hub.ca_pem, None, timeouts.0, timeouts.1).unwrap();
    let answer = anon
        .exchange(
            "/ccsp/v1/enrol",
            &Message::EnrolRequest(EnrolRequest {
                token: EnrolmentToken::new(token).unwrap(),
                csr_der: Bytes::try_from(csr).unwrap(),
                device_label: Text::new("bench client").unwrap(),
            }),
            MessageKind::EnrolResponse,
        )
        .unwrap();
    let Message::EnrolResponse(r) = answer.message else {
        panic!("enrol")
    };
    let id = Identity {
        cert_der: r.certificate_der.as_slice().to_vec(),
        key_pem: Zeroizing::new(key_pem),
    };
    let t = Transport::new(
        &hub.base_url(),
        &hub.ca_pem,
        Some(&id),
        timeouts.0,
        timeouts.1,
    )
    .unwrap();
    (t, r.device_id.as_str().to_owned())
}

/// Loads `rows` (key, encoded record) into a new SQLCipher database at `path` — WAL,
/// `synchronous=FULL`, 4 KiB pages, HMAC on: its defaults — 1,000 rows a transaction,
/// and returns the connection.
#[allow(dead_code, reason = "not every benchmark compares with SQLCipher")]
pub(crate) fn sqlcipher_load(
    path: &Path,
    rows: impl IntoIterator<Item = (i64, Vec<u8>)>,
) -> rusqlite::Connection {
    use rand::Rng;
    let db = rusqlite::Connection::open(path).unwrap();
    let key: String = (0..32)
        .map(|_| format!("{:02x}", rand::rng().random::<u8>()))
        .collect();
    db.execute_batch(&format!("PRAGMA key = \"x'{key}'\";"))
        .unwrap();
    db.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))
        .unwrap();
    db.execute_batch(
        "PRAGMA synchronous = FULL;
         CREATE TABLE patients (nhs INTEGER PRIMARY KEY, record BLOB NOT NULL);",
    )
    .unwrap();
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let tx = db.unchecked_transaction().unwrap();
        {
            let mut st = tx
                .prepare_cached("INSERT INTO patients (nhs, record) VALUES (?1, ?2)")
                .unwrap();
            for (nhs, bytes) in rows.by_ref().take(1000) {
                st.execute(rusqlite::params![nhs, bytes]).unwrap();
            }
        }
        tx.commit().unwrap();
    }
    db
}

/// Bytes of a SQLCipher database and its WAL after a full checkpoint.
#[allow(dead_code, reason = "not every benchmark compares with SQLCipher")]
pub(crate) fn sqlcipher_bytes(db: rusqlite::Connection, path: &Path) -> u64 {
    db.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    drop(db);
    let size = |p: PathBuf| std::fs::metadata(p).map_or(0, |m| m.len());
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    size(path.to_path_buf()) + size(PathBuf::from(wal))
}
