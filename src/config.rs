//! The daemon's configuration (`carecache.toml`): read, checked and turned into one
//! validated [`Config`] in a single step. Every key has a default except the hub's
//! address and CA.
//!
//! ```toml
//! data_dir = "/var/lib/carecache"
//!
//! [key]
//! source = "key_file"            # key_file | credential | passphrase
//! path = "/etc/carecache/root.key"
//!
//! [hub]
//! url = "https://hub.example:8443"
//! ca_file = "/etc/carecache/hub-ca.pem"
//!
//! [api]
//! listen = "127.0.0.1:7380"      # loopback only unless dangerous_listen_any = true
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sync_protocol::message::Pull;
use sync_protocol::sensitive::CodeList;

use crate::keysource::KeySource;

/// A configuration that cannot be used (the operator's file is at fault).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What the parser said (names the key and line).
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{path}: {key}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// The key at fault.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    data_dir: Option<PathBuf>,
    key: RawKey,
    hub: RawHub,
    #[serde(default)]
    sync: RawSync,
    #[serde(default)]
    device: RawDevice,
    #[serde(default)]
    api: RawApi,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    anchor: RawAnchor,
    identity: Option<RawIdentity>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAnchor {
    kind: Option<String>,
    path: Option<PathBuf>,
    tcti: Option<String>,
    nv_index: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    socket: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    mode: String,
    issuer: Option<String>,
    #[serde(default)]
    client_ids: Vec<String>,
    viewer_client_id: Option<String>,
    scopes: Option<String>,
    staff_claim: Option<String>,
    role_claim: Option<String>,
    algorithms: Option<Vec<String>>,
    #[serde(default = "defaults::max_session")]
    max_session_secs: u64,
    #[serde(default = "defaults::idle_lock")]
    idle_lock_secs: u64,
    #[serde(default = "defaults::max_token_age")]
    max_token_age_secs: u64,
    #[serde(default = "defaults::pin_attempts")]
    pin_attempts: u8,
    #[serde(default)]
    role_views: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    #[serde(default = "defaults::upload_interval")]
    upload_interval_secs: u64,
    #[serde(default = "defaults::upload_chunk")]
    upload_chunk: usize,
    #[serde(default = "defaults::warn_backlog_age")]
    warn_backlog_age_secs: u64,
}

impl Default for RawAudit {
    fn default() -> Self {
        Self {
            upload_interval_secs: defaults::upload_interval(),
            upload_chunk: defaults::upload_chunk(),
            warn_backlog_age_secs: defaults::warn_backlog_age(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    #[serde(default = "defaults::listen")]
    listen: Option<String>,
    socket: Option<PathBuf>,
    #[serde(default)]
    dangerous_listen_any: bool,
    #[serde(default = "defaults::stale_after")]
    stale_after_secs: u64,
    #[serde(default = "defaults::max_connections")]
    max_connections: usize,
    #[serde(default = "defaults::request_timeout")]
    request_timeout_secs: u64,
    #[serde(default = "defaults::max_header_bytes")]
    max_header_bytes: usize,
    #[serde(default)]
    allowed_hosts: Vec<String>,
}

impl Default for RawApi {
    fn default() -> Self {
        Self {
            listen: defaults::listen(),
            socket: None,
            dangerous_listen_any: false,
            stale_after_secs: defaults::stale_after(),
            max_connections: defaults::max_connections(),
            request_timeout_secs: defaults::request_timeout(),
            max_header_bytes: defaults::max_header_bytes(),
            allowed_hosts: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    source: String,
    path: Option<PathBuf>,
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHub {
    url: String,
    ca_file: PathBuf,
    #[serde(default = "defaults::connect_timeout")]
    connect_timeout_secs: u64,
    #[serde(default = "defaults::read_timeout")]
    read_timeout_secs: u64,
    #[serde(default = "defaults::max_batch_bytes")]
    max_batch_bytes: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSync {
    #[serde(default = "defaults::interval")]
    interval_secs: u64,
    #[serde(default = "defaults::tick")]
    tick_secs: u64,
    #[serde(default = "defaults::skew")]
    max_clock_skew_secs: u64,
    #[serde(default = "defaults::retry_min")]
    retry_min_secs: u64,
    #[serde(default = "defaults::retry_max")]
    retry_max_secs: u64,
    #[serde(default = "defaults::probe")]
    probe_secs: u64,
}

impl Default for RawSync {
    fn default() -> Self {
        Self {
            interval_secs: defaults::interval(),
            tick_secs: defaults::tick(),
            max_clock_skew_secs: defaults::skew(),
            retry_min_secs: defaults::retry_min(),
            retry_max_secs: defaults::retry_max(),
            probe_secs: defaults::probe(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    label: Option<String>,
    sensitive_codes: Option<PathBuf>,
}

mod defaults {
    #[allow(
        clippy::unnecessary_wraps,
        reason = "serde default for an optional key"
    )]
    pub(super) fn listen() -> Option<String> {
        Some(String::from("127.0.0.1:7380"))
    }
    pub(super) fn max_session() -> u64 {
        12 * 3600
    }
    pub(super) fn idle_lock() -> u64 {
        15 * 60
    }
    pub(super) fn max_token_age() -> u64 {
        600
    }
    pub(super) fn pin_attempts() -> u8 {
        5
    }
    pub(super) fn upload_interval() -> u64 {
        60
    }
    pub(super) fn upload_chunk() -> usize {
        4096
    }
    pub(super) fn warn_backlog_age() -> u64 {
        12 * 3600
    }
    pub(super) fn stale_after() -> u64 {
        3600
    }
    pub(super) fn max_connections() -> usize {
        256
    }
    pub(super) fn request_timeout() -> u64 {
        10
    }
    pub(super) fn max_header_bytes() -> usize {
        16 * 1024
    }
    pub(super) fn connect_timeout() -> u64 {
        10
    }
    pub(super) fn read_timeout() -> u64 {
        60
    }
    pub(super) fn max_batch_bytes() -> u32 {
        4 * 1024 * 1024
    }
    pub(super) fn interval() -> u64 {
        300
    }
    pub(super) fn tick() -> u64 {
        60
    }
    pub(super) fn skew() -> u64 {
        900
    }
    pub(super) fn retry_min() -> u64 {
        5
    }
    pub(super) fn retry_max() -> u64 {
        900
    }
    pub(super) fn probe() -> u64 {
        15
    }
}

/// Where the root key comes from (the passphrase itself is asked for at start).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyConfig {
    /// A key file outside the data directory.
    KeyFile(PathBuf),
    /// A systemd credential name.
    Credential(String),
    /// A passphrase from `$CARECACHE_PASSPHRASE` or the terminal.
    Passphrase,
}

impl KeyConfig {
    /// The key source, asking for the passphrase if this is one.
    pub fn source(&self) -> anyhow::Result<KeySource> {
        Ok(match self {
            Self::KeyFile(p) => KeySource::KeyFile(p.clone()),
            Self::Credential(n) => KeySource::Credential(n.clone()),
            Self::Passphrase => KeySource::Passphrase(crate::cli::passphrase(
                crate::cli::PASSPHRASE_ENV,
                "Passphrase: ",
            )?),
        })
    }
}

/// The hub connection.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// `https://host:port`, no path.
    pub url: String,
    /// The hub CA's certificate (PEM), pinned at enrolment.
    pub ca_file: PathBuf,
    /// TCP + TLS connect timeout.
    pub connect_timeout: Duration,
    /// Time allowed for one response to arrive whole.
    pub read_timeout: Duration,
    /// Byte budget asked for per batch.
    pub max_batch_bytes: u32,
}

/// The sync loop's timing.
#[derive(Clone, Debug)]
pub struct SyncConfig {
    /// Time between sync rounds when all is well.
    pub interval: Duration,
    /// Policy tick: lease expiry and purge happen within one tick, offline or not.
    pub tick: Duration,
    /// Largest accepted difference between hub time and trusted time.
    pub max_clock_skew: Duration,
    /// First retry delay after a failure (doubles, with jitter).
    pub retry_min: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// How often to probe the hub while it is unreachable.
    pub probe: Duration,
}

/// The local API.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// TCP address (loopback unless `dangerous_listen_any`); `None` for socket only.
    pub listen: Option<std::net::SocketAddr>,
    /// Unix socket path (mode 0660), if any.
    pub socket: Option<PathBuf>,
    /// Data older than this (since the last successful sync) is flagged stale.
    pub stale_after: Duration,
    /// Most connections served at once; more wait to be accepted.
    pub max_connections: usize,
    /// Longest a request may take, headers included.
    pub request_timeout: Duration,
    /// Largest request head (request line and headers).
    pub max_header_bytes: usize,
    /// Host names besides the loopback ones (`localhost`, 127.0.0.0/8, `[::1]`) that
    /// requests may be addressed to (`Host`), e.g. the name a non-loopback listener is
    /// reached by. Anything else is refused (DNS rebinding).
    pub allowed_hosts: Vec<String>,
}

/// Audit upload and the backlog guard.
#[derive(Clone, Debug)]
pub struct AuditConfig {
    /// How often the daemon uploads waiting entries, besides after every sync round.
    pub upload_interval: Duration,
    /// Most entries per push (the protocol allows 4,096).
    pub upload_chunk: usize,
    /// Past this age of the oldest entry not yet acknowledged by the hub, every API
    /// answer carries a warning header.
    pub warn_backlog_age: Duration,
}

/// A validated daemon configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The data directory.
    pub data_dir: PathBuf,
    /// The root key's source.
    pub key: KeyConfig,
    /// The hub.
    pub hub: HubConfig,
    /// Sync timing.
    pub sync: SyncConfig,
    /// Label sent at enrolment.
    pub device_label: String,
    /// Audit upload and the backlog guard.
    pub audit: AuditConfig,
    /// The sensitive code list the device re-checks records against.
    pub sensitive: CodeList,
    /// The local API.
    pub api: ApiConfig,
    /// Staff identity: asserted by the client software, or proven by OpenID Connect.
    pub identity: crate::identity::Mode,
    /// The admin channel: the running daemon's unix socket (mode 0600, peer credentials
    /// checked) that the CLI's commands talk to. Default: `admin.sock` in the data
    /// directory.
    pub admin_socket: PathBuf,
    /// The anti-rollback anchor (`[anchor]`).
    pub anchor: AnchorConfig,
}

/// `[anchor]`: what binds the store to a count outside the data directory (see
/// [`crate::anchor`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AnchorConfig {
    /// None (the default): a restored copy of the data directory is not detected.
    None,
    /// A counter file outside the data directory (`kind = "file"`, `path`).
    File(PathBuf),
    /// A TPM 2.0 NV counter (`kind = "tpm"`, `tcti`, `nv_index`; feature `tpm`).
    Tpm {
        /// How the TPM is reached (default `device:/dev/tpmrm0`).
        tcti: String,
        /// The NV index (default 0x0100CACE).
        nv_index: u32,
    },
}

impl AnchorConfig {
    /// The counter this configuration names, if any.
    pub fn counter(&self) -> Option<std::sync::Arc<dyn crate::anchor::Counter>> {
        match self {
            Self::None => None,
            Self::File(path) => Some(std::sync::Arc::new(crate::anchor::FileCounter::new(path))),
            #[cfg(feature = "tpm")]
            Self::Tpm { tcti, nv_index } => Some(std::sync::Arc::new(
                crate::anchor::TpmCounter::new(tcti, *nv_index),
            )),
            // Refused when the configuration is read.
            #[cfg(not(feature = "tpm"))]
            Self::Tpm { .. } => None,
        }
    }
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Validates configuration text; `path` names it in errors and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let name = path.display().to_string();
        let raw: Raw = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: name.clone(),
            message: e.to_string(),
        })?;
        let invalid = |key, reason: &str| ConfigError::Invalid {
            path: name.clone(),
            key,
            reason: reason.to_owned(),
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let anchor = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
        let key = match (raw.key.source.as_str(), raw.key.path, raw.key.name) {
            ("key_file", Some(p), None) => KeyConfig::KeyFile(anchor(p)),
            ("credential", None, Some(n)) => KeyConfig::Credential(n),
            ("passphrase", None, None) => KeyConfig::Passphrase,
            ("key_file", ..) => return Err(invalid("key.path", "key_file needs `path` only")),
            ("credential", ..) => return Err(invalid("key.name", "credential needs `name` only")),
            ("passphrase", ..) => {
                return Err(invalid("key", "passphrase takes no `path` or `name`"));
            }
            _ => {
                return Err(invalid(
                    "key.source",
                    "must be key_file, credential or passphrase",
                ));
            }
        };
        let url = raw.hub.url.trim_end_matches('/').to_owned();
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| invalid("hub.url", "must start with https://"))?;
        if rest.is_empty() || rest.contains('/') || rest.contains('@') {
            return Err(invalid(
                "hub.url",
                "must be https://host[:port] with no path",
            ));
        }
        let secs = |key, v: u64, min: u64, max: u64| {
            if (min..=max).contains(&v) {
                Ok(Duration::from_secs(v))
            } else {
                Err(invalid(key, &format!("must be {min}..={max} seconds")))
            }
        };
        let max = sync_protocol::MessageKind::Batch.max_payload();
        if !(Pull::MIN_BUDGET..=max).contains(&raw.hub.max_batch_bytes) {
            return Err(invalid(
                "hub.max_batch_bytes",
                &format!("must be {}..={max}", Pull::MIN_BUDGET),
            ));
        }
        let s = raw.sync;
        let sync = SyncConfig {
            interval: secs("sync.interval_secs", s.interval_secs, 10, 86_400)?,
            tick: secs("sync.tick_secs", s.tick_secs, 1, 60)?,
            max_clock_skew: secs("sync.max_clock_skew_secs", s.max_clock_skew_secs, 1, 86_400)?,
            retry_min: secs("sync.retry_min_secs", s.retry_min_secs, 1, 3600)?,
            retry_max: secs("sync.retry_max_secs", s.retry_max_secs, 1, 86_400)?,
            probe: secs("sync.probe_secs", s.probe_secs, 1, 3600)?,
        };
        if sync.retry_max < sync.retry_min {
            return Err(invalid("sync.retry_max_secs", "must be ≥ retry_min_secs"));
        }
        let sensitive = match raw.device.sensitive_codes {
            None => CodeList::shipped(),
            Some(p) => {
                let p = anchor(p);
                let text = std::fs::read_to_string(&p).map_err(|source| ConfigError::Read {
                    path: p.display().to_string(),
                    source,
                })?;
                CodeList::parse(&text)
                    .map_err(|e| invalid("device.sensitive_codes", &e.to_string()))?
            }
        };
        let a = raw.api;
        let listen = match a.listen.as_deref() {
            None | Some("") => None,
            Some(text) => {
                let addr: std::net::SocketAddr = text
                    .parse()
                    .map_err(|_| invalid("api.listen", "must be IP:PORT, e.g. 127.0.0.1:7380"))?;
                if !addr.ip().is_loopback() && !a.dangerous_listen_any {
                    return Err(invalid(
                        "api.listen",
                        "is not a loopback address: the API serves patient data to software on this device only (set api.dangerous_listen_any = true to override)",
                    ));
                }
                Some(addr)
            }
        };
        if listen.is_none() && a.socket.is_none() {
            return Err(invalid("api", "set `listen`, `socket`, or both"));
        }
        if !(1..=10_000).contains(&a.max_connections) {
            return Err(invalid("api.max_connections", "must be 1..=10000"));
        }
        if !(8 * 1024..=1024 * 1024).contains(&a.max_header_bytes) {
            return Err(invalid("api.max_header_bytes", "must be 8192..=1048576"));
        }
        for h in &a.allowed_hosts {
            let ok = !h.is_empty()
                && h.len() <= 253
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'));
            if !ok {
                return Err(invalid(
                    "api.allowed_hosts",
                    "host names only (letters, digits, '.', '-'), without port or scheme",
                ));
            }
        }
        let api = ApiConfig {
            allowed_hosts: a
                .allowed_hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            listen,
            socket: a.socket.map(anchor),
            stale_after: secs("api.stale_after_secs", a.stale_after_secs, 60, 30 * 86_400)?,
            max_connections: a.max_connections,
            request_timeout: secs("api.request_timeout_secs", a.request_timeout_secs, 1, 300)?,
            max_header_bytes: a.max_header_bytes,
        };
        let audit = AuditConfig {
            upload_interval: secs(
                "audit.upload_interval_secs",
                raw.audit.upload_interval_secs,
                1,
                86_400,
            )?,
            upload_chunk: if (1..=4096).contains(&raw.audit.upload_chunk) {
                raw.audit.upload_chunk
            } else {
                return Err(invalid("audit.upload_chunk", "must be 1..=4096"));
            },
            warn_backlog_age: secs(
                "audit.warn_backlog_age_secs",
                raw.audit.warn_backlog_age_secs,
                60,
                30 * 86_400,
            )?,
        };
        let identity = identity(raw.identity, &invalid)?;
        let label = raw
            .device
            .label
            .unwrap_or_else(|| String::from("carecache device"));
        if label.is_empty() || label.len() > 64 || label.chars().any(char::is_control) {
            return Err(invalid("device.label", "1–64 printable characters"));
        }
        let data_dir = anchor(
            raw.data_dir
                .unwrap_or_else(|| PathBuf::from("/var/lib/carecache")),
        );
        let admin_socket = raw
            .admin
            .socket
            .map_or_else(|| data_dir.join("admin.sock"), anchor);
        // A unix socket's path is at most 107 bytes (sun_path).
        if admin_socket.as_os_str().len() > 107 {
            return Err(invalid(
                "admin.socket",
                "the admin socket's path is longer than a unix socket allows (107 bytes): set admin.socket to a shorter path",
            ));
        }
        let anchor_config = anchor_config(raw.anchor, &data_dir, &anchor, &invalid)?;
        Ok(Self {
            data_dir,
            admin_socket,
            anchor: anchor_config,
            key,
            hub: HubConfig {
                url,
                ca_file: anchor(raw.hub.ca_file),
                connect_timeout: secs(
                    "hub.connect_timeout_secs",
                    raw.hub.connect_timeout_secs,
                    1,
                    600,
                )?,
                read_timeout: secs("hub.read_timeout_secs", raw.hub.read_timeout_secs, 1, 3600)?,
                max_batch_bytes: raw.hub.max_batch_bytes,
            },
            sync,
            device_label: label,
            sensitive,
            api,
            audit,
            identity,
        })
    }
}

/// `[anchor]`: none by default; a counter file outside the data directory; or a TPM NV
/// counter (only in a build with feature `tpm`).
fn anchor_config(
    raw: RawAnchor,
    data_dir: &Path,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
    invalid: &dyn Fn(&'static str, &str) -> ConfigError,
) -> Result<AnchorConfig, ConfigError> {
    let kind = raw.kind.as_deref().unwrap_or("none");
    let unused = |key: &'static str, set: bool| {
        if set {
            Err(invalid(key, "not used by this anchor kind"))
        } else {
            Ok(())
        }
    };
    match kind {
        "none" => {
            unused("anchor.path", raw.path.is_some())?;
            unused("anchor.tcti", raw.tcti.is_some())?;
            unused("anchor.nv_index", raw.nv_index.is_some())?;
            Ok(AnchorConfig::None)
        }
        "file" => {
            unused("anchor.tcti", raw.tcti.is_some())?;
            unused("anchor.nv_index", raw.nv_index.is_some())?;
            let path = resolve(
                raw.path
                    .ok_or_else(|| invalid("anchor.path", "a file anchor needs a path"))?,
            );
            if crate::store::refuse_inside(data_dir, &path).is_err() {
                return Err(invalid(
                    "anchor.path",
                    "the counter file must lie outside the data directory (a copy of the directory must not carry it)",
                ));
            }
            Ok(AnchorConfig::File(path))
        }
        "tpm" => {
            unused("anchor.path", raw.path.is_some())?;
            if !cfg!(feature = "tpm") {
                return Err(invalid(
                    "anchor.kind",
                    "this build has no TPM support: build carecache with `--features tpm` (needs libtss2-dev)",
                ));
            }
            let tcti = raw
                .tcti
                .unwrap_or_else(|| crate::anchor::DEFAULT_TCTI.to_owned());
            let nv_index = match raw.nv_index {
                None => crate::anchor::DEFAULT_NV_INDEX,
                Some(text) => text
                    .strip_prefix("0x")
                    .or_else(|| text.strip_prefix("0X"))
                    .and_then(|h| u32::from_str_radix(&h.replace('_', ""), 16).ok())
                    // The owner's range of NV indices.
                    .filter(|i| (0x0100_0000..=0x013F_FFFF).contains(i))
                    .ok_or_else(|| {
                        invalid(
                            "anchor.nv_index",
                            "a hexadecimal NV index in the owner's range, 0x01000000 to 0x013FFFFF",
                        )
                    })?,
            };
            Ok(AnchorConfig::Tpm { tcti, nv_index })
        }
        _ => Err(invalid("anchor.kind", "one of \"none\", \"file\", \"tpm\"")),
    }
}

/// `[identity]`: required, so that a production configuration says which mode vouches
/// for staff ids.
fn identity(
    raw: Option<RawIdentity>,
    invalid: &dyn Fn(&'static str, &str) -> ConfigError,
) -> Result<crate::identity::Mode, ConfigError> {
    use crate::identity::{Mode, OidcConfig};
    let Some(r) = raw else {
        return Err(invalid(
            "identity",
            "missing: set [identity] mode = \"oidc\" (staff proven by the region's OpenID Connect provider, with issuer and client_ids) or mode = \"asserted\" (the client software vouches for the staff id)",
        ));
    };
    let secs = |key, v: u64, min: u64, max: u64| {
        if (min..=max).contains(&v) {
            Ok(Duration::from_secs(v))
        } else {
            Err(invalid(key, &format!("must be {min}..={max} seconds")))
        }
    };
    match r.mode.as_str() {
        "asserted" => {
            if r.issuer.is_some() || !r.client_ids.is_empty() {
                return Err(invalid(
                    "identity.issuer",
                    "asserted mode takes no issuer or client_ids (did you mean mode = \"oidc\"?)",
                ));
            }
            Ok(Mode::Asserted)
        }
        "oidc" => {
            let issuer = r
                .issuer
                .map(|i| i.trim_end_matches('/').to_owned())
                .ok_or_else(|| invalid("identity.issuer", "oidc mode needs the issuer URL"))?;
            let loopback_http = ["127.0.0.1", "localhost", "[::1]"].iter().any(|host| {
                issuer
                    .strip_prefix("http://")
                    .and_then(|rest| rest.strip_prefix(host))
                    .is_some_and(|after| after.is_empty() || after.starts_with([':', '/']))
            });
            if !(issuer.starts_with("https://") || loopback_http) {
                return Err(invalid(
                    "identity.issuer",
                    "must be https:// (plain http only for a provider on this machine's loopback)",
                ));
            }
            if r.client_ids.is_empty() || r.client_ids.iter().any(|c| c.is_empty() || c.len() > 256)
            {
                return Err(invalid(
                    "identity.client_ids",
                    "list the client ids (audiences) whose ID tokens this device accepts",
                ));
            }
            let viewer_client_id = r
                .viewer_client_id
                .or_else(|| r.client_ids.first().cloned())
                .unwrap_or_default();
            if !r.client_ids.contains(&viewer_client_id) {
                return Err(invalid(
                    "identity.viewer_client_id",
                    "must be one of client_ids",
                ));
            }
            let mut algorithms = Vec::new();
            for a in r
                .algorithms
                .unwrap_or_else(|| vec!["RS256".into(), "ES256".into()])
            {
                use jsonwebtoken::Algorithm as A;
                let alg = match a.as_str() {
                    "RS256" => A::RS256,
                    "RS384" => A::RS384,
                    "RS512" => A::RS512,
                    "PS256" => A::PS256,
                    "PS384" => A::PS384,
                    "PS512" => A::PS512,
                    "ES256" => A::ES256,
                    "ES384" => A::ES384,
                    "EdDSA" => A::EdDSA,
                    _ => {
                        return Err(invalid(
                            "identity.algorithms",
                            "only asymmetric JWS algorithms (RS256/384/512, PS256/384/512, ES256/384, EdDSA); never none or HMAC",
                        ));
                    }
                };
                algorithms.push(alg);
            }
            if algorithms.is_empty() {
                return Err(invalid("identity.algorithms", "name at least one"));
            }
            let mut role_views = Vec::new();
            for (role, view) in r.role_views {
                let v = match view.as_str() {
                    "social-care" => sync_protocol::message::View::SocialCare,
                    "clinical" => sync_protocol::message::View::Clinical,
                    _ => {
                        return Err(invalid(
                            "identity.role_views",
                            "each role maps to \"social-care\" or \"clinical\"",
                        ));
                    }
                };
                role_views.push((role, v));
            }
            if !(3..=10).contains(&r.pin_attempts) {
                return Err(invalid("identity.pin_attempts", "must be 3..=10"));
            }
            Ok(Mode::Oidc(Box::new(OidcConfig {
                issuer,
                client_ids: r.client_ids,
                viewer_client_id,
                scopes: r.scopes.unwrap_or_else(|| "openid".into()),
                staff_claim: r.staff_claim.unwrap_or_else(|| "sub".into()),
                role_claim: match r.role_claim.as_deref() {
                    None => Some("selected_roleid".into()),
                    Some("") => None,
                    Some(c) => Some(c.to_owned()),
                },
                role_views,
                algorithms,
                max_session: secs("identity.max_session_secs", r.max_session_secs, 10, 86_400)?,
                idle_lock: secs("identity.idle_lock_secs", r.idle_lock_secs, 5, 86_400)?,
                max_token_age: secs(
                    "identity.max_token_age_secs",
                    r.max_token_age_secs,
                    10,
                    86_400,
                )?,
                pin_attempts: r.pin_attempts,
            })))
        }
        _ => Err(invalid("identity.mode", "must be \"oidc\" or \"asserted\"")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
data_dir = "data"
[key]
source = "key_file"
path = "/etc/carecache/root.key"
[hub]
url = "https://hub.example:8443/"
ca_file = "ca.pem"
[identity]
mode = "asserted"
"#;

    #[test]
    fn defaults_and_relative_paths() {
        let c = Config::parse(GOOD, Path::new("/etc/carecache/carecache.toml")).unwrap();
        assert_eq!(c.data_dir, Path::new("/etc/carecache/data"));
        assert_eq!(c.hub.url, "https://hub.example:8443");
        assert_eq!(c.hub.ca_file, Path::new("/etc/carecache/ca.pem"));
        assert_eq!(c.sync.tick, Duration::from_secs(60));
        assert_eq!(c.hub.max_batch_bytes, 4 * 1024 * 1024);
        assert_eq!(c.api.listen, Some("127.0.0.1:7380".parse().unwrap()));
        assert_eq!(c.api.socket, None);
        assert_eq!(c.audit.upload_interval, Duration::from_secs(60));
        assert_eq!(c.audit.upload_chunk, 4096);
        assert_eq!(c.audit.warn_backlog_age, Duration::from_secs(12 * 3600));
    }

    #[test]
    fn a_non_loopback_listener_needs_the_dangerous_switch() {
        let p = Path::new("c.toml");
        let text = format!("{GOOD}[api]\nlisten = \"0.0.0.0:7380\"\ndangerous_listen_any = true\n");
        let c = Config::parse(&text, p).unwrap();
        assert_eq!(c.api.listen, Some("0.0.0.0:7380".parse().unwrap()));
        let text = format!("{GOOD}[api]\nlisten = \"[::1]:7380\"\nsocket = \"/run/cc.sock\"\n");
        let c = Config::parse(&text, p).unwrap();
        assert!(c.api.listen.is_some() && c.api.socket.is_some());
    }

    #[test]
    fn bad_values_name_their_key() {
        let p = Path::new("c.toml");
        for (text, key) in [
            (GOOD.replace("https://hub", "http://hub"), "hub.url"),
            (GOOD.replace("key_file", "usb"), "key.source"),
            (
                format!("{GOOD}[sync]\ntick_secs = 3600\n"),
                "sync.tick_secs",
            ),
            (
                GOOD.replace("ca_file", "max_batch_bytes = 10\nca_file"),
                "hub.max_batch_bytes",
            ),
            (
                format!("{GOOD}[sync]\nretry_min_secs = 60\nretry_max_secs = 10\n"),
                "sync.retry_max_secs",
            ),
            (format!("{GOOD}[sync]\ntypo = 1\n"), "typo"),
            (
                format!("{GOOD}[audit]\nupload_chunk = 5000\n"),
                "audit.upload_chunk",
            ),
            (
                format!("{GOOD}[audit]\nwarn_backlog_age_secs = 1\n"),
                "audit.warn_backlog_age_secs",
            ),
            (
                format!("{GOOD}[api]\nlisten = \"0.0.0.0:7380\"\n"),
                "api.listen",
            ),
            (
                format!("{GOOD}[api]\nlisten = \"10.1.2.3:7380\"\n"),
                "api.listen",
            ),
            (
                format!("{GOOD}[api]\nlisten = \"localhost\"\n"),
                "api.listen",
            ),
            (format!("{GOOD}[api]\nlisten = \"\"\n"), "api"),
            (
                format!("{GOOD}[api]\nmax_header_bytes = 100\n"),
                "api.max_header_bytes",
            ),
            (
                format!("{GOOD}[api]\nallowed_hosts = [\"tablet 7:80\"]\n"),
                "api.allowed_hosts",
            ),
            (GOOD.replace("[identity]\nmode = \"asserted\"\n", ""), "identity"),
            (GOOD.replace("\"asserted\"", "\"trust-me\""), "identity.mode"),
            (GOOD.replace("\"asserted\"", "\"oidc\""), "identity.issuer"),
            (
                GOOD.replace(
                    "\"asserted\"",
                    "\"oidc\"\nissuer = \"http://idp.example\"\nclient_ids = [\"a\"]",
                ),
                "identity.issuer",
            ),
            (
                GOOD.replace(
                    "\"asserted\"",
                    "\"oidc\"\nissuer = \"https://idp.example\"\nclient_ids = [\"a\"]\nalgorithms = [\"HS256\"]",
                ),
                "identity.algorithms",
            ),
            (
                GOOD.replace(
                    "\"asserted\"",
                    "\"oidc\"\nissuer = \"https://idp.example\"\nclient_ids = []",
                ),
                "identity.client_ids",
            ),
        ] {
            let err = Config::parse(&text, p).unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
    }
}
