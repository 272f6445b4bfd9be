//! What the device benchmarks share.

use std::path::{Path, PathBuf};

use carecache::crypto::RootKey;
use carecache::keysource::{SourceKind, create_key_file};
use carecache::store::Store;
use carecache_hub::testing::TestHub;

/// An initialised data directory with a key file in `dir`, and a `carecache.toml` for
/// `hub` there whose `[hub]` section ends with `extra` (which may open more sections).
/// Returns the root key and the config path.
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
