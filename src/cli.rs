//! Command-line commands that manage a data directory: `init`, `rekey`, `wipe`.
//!
//! Raw flags and environment become a validated key source in one step; secrets come from a
//! terminal prompt, or for scripts from `CARECACHE_PASSPHRASE` / `CARECACHE_NEW_PASSPHRASE`.

#![allow(
    clippy::print_stdout,
    reason = "these functions are the commands' output"
)]

use std::io::{self, BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::crypto::RootKey;
use crate::keysource::{
    KdfParams, KeySource, Passphrase, SourceKind, create_key_file, read_credential, read_key_file,
    write_key_file,
};
use crate::store::{self, Store};

/// Environment variable holding the passphrase for scripts (instead of a prompt).
pub const PASSPHRASE_ENV: &str = "CARECACHE_PASSPHRASE";
/// Environment variable holding the new passphrase for `rekey` in scripts.
pub const NEW_PASSPHRASE_ENV: &str = "CARECACHE_NEW_PASSPHRASE";

/// Where the data directory is.
#[derive(Debug, clap::Args)]
pub struct DataDirArgs {
    /// The data directory (created by `init`, mode 0700).
    #[arg(long, env = "CARECACHE_DATA_DIR", default_value = "/var/lib/carecache")]
    pub data_dir: PathBuf,
}

/// Exactly one root-key source.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct KeyArgs {
    /// A key file (64 hex digits, mode 0600, outside the data directory).
    #[arg(long, value_name = "PATH")]
    pub key_file: Option<PathBuf>,
    /// A systemd credential in $CREDENTIALS_DIRECTORY.
    #[arg(long, value_name = "NAME")]
    pub credential: Option<String>,
    /// A passphrase (prompted, or $CARECACHE_PASSPHRASE).
    #[arg(long)]
    pub passphrase: bool,
}

/// The new root-key source for `rekey`.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct NewKeyArgs {
    /// Write a new random key to this file (it may be the current key file: replaced
    /// atomically once the store uses the new key).
    #[arg(long, value_name = "PATH")]
    pub new_key_file: Option<PathBuf>,
    /// Use the key in this systemd credential (create it first with systemd-creds).
    #[arg(long, value_name = "NAME")]
    pub new_credential: Option<String>,
    /// Use a new passphrase (prompted, or $CARECACHE_NEW_PASSPHRASE).
    #[arg(long)]
    pub new_passphrase: bool,
}

/// Argon2id cost for a new passphrase.
#[derive(Debug, clap::Args)]
pub struct KdfArgs {
    /// Argon2id memory in MiB (at least 8).
    #[arg(long, default_value_t = KdfParams::DEFAULT_MEMORY_KIB / 1024)]
    pub argon2_memory_mib: u32,
    /// Argon2id passes.
    #[arg(long, default_value_t = KdfParams::DEFAULT_ITERATIONS)]
    pub argon2_passes: u32,
}

impl KdfArgs {
    fn params(&self) -> anyhow::Result<KdfParams> {
        Ok(KdfParams::new(
            self.argon2_memory_mib.saturating_mul(1024),
            self.argon2_passes,
        )?)
    }
}

/// `carecache init`.
pub fn init(dir: &DataDirArgs, key: &KeyArgs, kdf: &KdfArgs) -> anyhow::Result<()> {
    let data_dir = &dir.data_dir;
    let (root, kind, params) = if let Some(path) = &key.key_file {
        store::refuse_inside(data_dir, path)?;
        if path.exists() {
            (read_key_file(path)?, SourceKind::KeyFile, None)
        } else {
            let root = create_key_file(path)?;
            println!("wrote a new root key to {} (mode 0600)", path.display());
            (root, SourceKind::KeyFile, None)
        }
    } else if let Some(name) = &key.credential {
        (read_credential(name)?, SourceKind::Credential, None)
    } else {
        let pass = new_passphrase(PASSPHRASE_ENV)?;
        let params = kdf.params()?;
        (params.derive(&pass)?, SourceKind::Passphrase, Some(params))
    };
    Store::create(data_dir, &root, kind, params)?;
    println!(
        "initialised {} (root key from {})",
        data_dir.display(),
        kind.describe()
    );
    Ok(())
}

/// `carecache rekey`: wraps the master key under a new root key; no record is re-encrypted.
pub fn rekey(
    dir: &DataDirArgs,
    key: &KeyArgs,
    new: &NewKeyArgs,
    kdf: &KdfArgs,
) -> anyhow::Result<()> {
    let data_dir = &dir.data_dir;
    let source = key_source(key, PASSPHRASE_ENV)?;
    let root = store::unlock(data_dir, &source)?;
    let store = Store::open(data_dir, &root)?;
    let old_kind = match &source {
        KeySource::KeyFile(_) => SourceKind::KeyFile,
        KeySource::Credential(_) => SourceKind::Credential,
        KeySource::Passphrase(_) => SourceKind::Passphrase,
    };
    let new_kind = if new.new_key_file.is_some() {
        SourceKind::KeyFile
    } else if new.new_credential.is_some() {
        SourceKind::Credential
    } else {
        SourceKind::Passphrase
    };
    if let Some(path) = &new.new_key_file {
        store::refuse_inside(data_dir, path)?;
        let same = matches!(&source, KeySource::KeyFile(old) if same_file(old, path));
        let new_root = RootKey::random()?;
        // Write the new key before the store uses it, so no crash leaves a store whose key
        // exists nowhere. Rotating in place goes through a temporary file and a rename.
        let target = if same {
            path.with_extension("new")
        } else {
            path.clone()
        };
        if same && target.exists() {
            // Left by a rotation killed before the store used it (`unlock` above finishes
            // one killed after): the store never used this key.
            std::fs::remove_file(&target)
                .with_context(|| format!("removing the leftover {}", target.display()))?;
        }
        write_key_file(&target, &new_root)?;
        store.rekey(&new_root, SourceKind::KeyFile, None)?;
        if same {
            std::fs::rename(&target, path)
                .with_context(|| format!("moving the new key into {}", path.display()))?;
            sync_parent(path)?;
        }
        println!("root key rotated; the new key is in {}", path.display());
    } else if let Some(name) = &new.new_credential {
        let new_root = read_credential(name)?;
        store.rekey(&new_root, SourceKind::Credential, None)?;
        println!("root key rotated to systemd credential {name:?}");
    } else {
        let pass = new_passphrase(NEW_PASSPHRASE_ENV)?;
        let params = kdf.params()?;
        store.rekey(&params.derive(&pass)?, SourceKind::Passphrase, Some(params))?;
        println!("root key rotated to the new passphrase");
    }
    println!("the old key no longer opens {}", data_dir.display());
    // The rotation is a key event: audited like any other, uploaded with the rest; a
    // change of the kind of source is an event of its own.
    use sync_protocol::audit::{AuditEvent, KeyEvent};
    let store = std::sync::Arc::new(store);
    crate::device::audit_offline(&store, AuditEvent::Key(KeyEvent::Rekeyed))
        .context("the key was rotated, but its audit entry could not be written")?;
    if old_kind != new_kind {
        let code = |k: SourceKind| {
            sync_protocol::types::Text::new(k.code())
                .unwrap_or_else(|_| unreachable!("a short ASCII name"))
        };
        crate::device::audit_offline(
            &store,
            AuditEvent::Key(KeyEvent::KeySourceChanged {
                from: code(old_kind),
                to: code(new_kind),
            }),
        )
        .context("the key source was changed, but its audit entry could not be written")?;
    }
    Ok(())
}

/// `carecache wipe`: destroys the keys, then the data. Needs no key.
pub fn wipe(dir: &DataDirArgs, yes: bool) -> anyhow::Result<()> {
    let data_dir = &dir.data_dir;
    if !data_dir.exists() {
        bail!("{} does not exist; nothing to wipe", data_dir.display());
    }
    if !yes {
        let stdin = io::stdin();
        if !stdin.is_terminal() {
            bail!(
                "refusing to wipe {} without confirmation: run in a terminal, or pass --yes",
                data_dir.display()
            );
        }
        print!(
            "This destroys every cached record and every audit entry not yet uploaded in {}.\nType WIPE to confirm: ",
            data_dir.display()
        );
        io::stdout().flush()?;
        let mut answer = String::new();
        stdin.lock().read_line(&mut answer)?;
        if answer.trim() != "WIPE" {
            bail!("not confirmed; nothing was changed");
        }
    }
    store::wipe(data_dir)?;
    println!("wiped {}: keys destroyed, data removed", data_dir.display());
    Ok(())
}

/// Turns key flags into a key source (prompting for a passphrase if needed).
pub fn key_source(key: &KeyArgs, env: &str) -> anyhow::Result<KeySource> {
    Ok(if let Some(path) = &key.key_file {
        KeySource::KeyFile(path.clone())
    } else if let Some(name) = &key.credential {
        KeySource::Credential(name.clone())
    } else {
        KeySource::Passphrase(passphrase(env, "Passphrase: ")?)
    })
}

pub(crate) fn passphrase(env: &str, prompt: &str) -> anyhow::Result<Passphrase> {
    if let Ok(p) = std::env::var(env) {
        return Ok(Passphrase::new(p));
    }
    if !io::stdin().is_terminal() {
        bail!("no passphrase: set ${env} or run in a terminal");
    }
    Ok(Passphrase::new(rpassword::prompt_password(prompt)?))
}

fn new_passphrase(env: &str) -> anyhow::Result<Passphrase> {
    let from_env = std::env::var_os(env).is_some();
    let pass = passphrase(env, "New passphrase: ")?;
    pass.check_new()?;
    if !from_env {
        let again = Passphrase::new(rpassword::prompt_password("Repeat it: ")?);
        if !pass.same_as(&again) {
            bail!("the passphrases differ; nothing was changed");
        }
    }
    Ok(pass)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

fn sync_parent(path: &Path) -> anyhow::Result<()> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    let dir = parent.unwrap_or_else(|| Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}
