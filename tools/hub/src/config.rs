//! `hub.toml`: read once, checked whole, turned into one valid configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::state::LeaseSpec;

/// The hub's configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address for the sync protocol and the admin API (HTTPS).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Directory for the hub's database.
    pub data_dir: PathBuf,
    /// File holding the admin API token (first line). The environment variable
    /// `CARECACHE_HUB_ADMIN_TOKEN` overrides it.
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    /// File holding the privacy officer's token (first line), the one credential that
    /// clears a device's restored copy. The environment variable
    /// `CARECACHE_HUB_PRIVACY_TOKEN` overrides it. Unset: no one can clear one.
    #[serde(default)]
    pub privacy_officer_token_file: Option<PathBuf>,
    /// File holding the token Prometheus scrapes `/metrics` with (first line); it opens
    /// nothing else. `CARECACHE_HUB_METRICS_TOKEN` overrides it. Unset: only the admin
    /// token reads the metrics.
    #[serde(default)]
    pub metrics_token_file: Option<PathBuf>,
    /// TLS files.
    pub tls: TlsConfig,
    /// The hub's database.
    #[serde(default)]
    pub store: StoreConfig,
    /// Where the shared care record comes from.
    pub source: SourceConfig,
    /// Sensitive-data exclusions.
    #[serde(default)]
    pub sharing: SharingConfig,
    /// Request limits.
    #[serde(default)]
    pub limits: Limits,
    /// When a device needs attention in the fleet view.
    #[serde(default)]
    pub fleet: crate::fleet::FleetLimits,
    /// Leases granted from the config file (updated by name on each start).
    #[serde(default, rename = "lease")]
    pub leases: Vec<LeaseSpec>,
    /// Where stored device audit is forwarded as FHIR AuditEvent (unset: kept here only).
    #[serde(default)]
    pub forward: Option<ForwardConfig>,
}

/// `[forward]`: the FHIR R4 audit store the hub forwards device audit to.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardConfig {
    /// The FHIR server's base URL (`https://…/fhir`; `http://` for loopback only).
    pub url: String,
    /// PEM file of the CA that issued the server's certificate (default: the public
    /// web roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// File holding a bearer token for the server (first line);
    /// `CARECACHE_HUB_FORWARD_TOKEN` overrides it.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// AuditEvents per batch Bundle (1–1000).
    #[serde(default = "default_forward_batch")]
    pub batch: u32,
    /// Seconds between forwarding passes (1–86400).
    #[serde(default = "default_forward_interval")]
    pub interval_secs: u64,
}

fn default_forward_batch() -> u32 {
    200
}

fn default_forward_interval() -> u64 {
    60
}

/// Which engine holds the hub's state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// One embedded file, `hub.redb` in the data directory, owned by one hub process.
    #[default]
    Redb,
    /// A PostgreSQL database, shared by any number of hub instances.
    Postgres,
}

/// The hub's database (`[store]`).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `redb` (default) or `postgres`.
    #[serde(default)]
    pub kind: StoreKind,
    /// Page cache of the embedded database, in MiB: the hub's memory beyond it stays
    /// flat whatever the region's size.
    #[serde(default = "default_cache_mib")]
    pub cache_mib: u32,
    /// PostgreSQL: connection URL (`postgresql://user@host:port/db?sslmode=require`).
    /// Better given in the environment as `CARECACHE_HUB_DATABASE_URL` (it may hold a
    /// password), which this overrides.
    #[serde(default)]
    pub url: Option<String>,
    /// PostgreSQL: the schema holding the hub's tables (created if missing).
    #[serde(default = "default_schema")]
    pub schema: String,
    /// PostgreSQL: connections each hub instance keeps.
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// PostgreSQL: PEM file of the CA that issued the database server's certificate.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password.
        f.debug_struct("StoreConfig")
            .field("kind", &self.kind)
            .field("cache_mib", &self.cache_mib)
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            kind: StoreKind::Redb,
            cache_mib: default_cache_mib(),
            url: None,
            schema: default_schema(),
            pool_size: default_pool_size(),
            ca_file: None,
        }
    }
}

impl StoreConfig {
    /// The PostgreSQL options, the URL from `url` or else `CARECACHE_HUB_DATABASE_URL`.
    pub fn postgres(&self) -> Result<crate::state::PgOptions, ConfigError> {
        let url = match &self.url {
            Some(u) => u.clone(),
            None => std::env::var("CARECACHE_HUB_DATABASE_URL").map_err(|_| {
                ConfigError::Invalid(
                    "store.kind = \"postgres\" needs store.url or CARECACHE_HUB_DATABASE_URL"
                        .into(),
                )
            })?,
        };
        Ok(crate::state::PgOptions {
            url,
            schema: self.schema.clone(),
            pool_size: self.pool_size,
            ca_file: self.ca_file.clone(),
        })
    }
}

fn default_schema() -> String {
    "carecache".into()
}

fn default_pool_size() -> u32 {
    8
}

fn default_cache_mib() -> u32 {
    u32::try_from(crate::state::DEFAULT_CACHE_BYTES / (1024 * 1024)).unwrap_or(64)
}

/// TLS files (PEM).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// CA certificate: verifies device certificates; devices pin it.
    pub ca_cert: PathBuf,
    /// CA key: signs device certificates at enrolment.
    pub ca_key: PathBuf,
    /// Hub server certificate.
    pub cert: PathBuf,
    /// Hub server key.
    pub key: PathBuf,
    /// Validity of issued device certificates.
    #[serde(default = "default_cert_days")]
    pub device_cert_days: i64,
}

/// The upstream source.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    /// A directory of FHIR Bulk Data NDJSON files, read whole at each ingest.
    Ndjson {
        /// The directory.
        path: PathBuf,
        /// Re-read interval (0: only at start and on `POST /admin/v1/ingest`).
        #[serde(default)]
        poll_secs: u64,
    },
    /// A FHIR R4 server's REST API, polled incrementally by `_lastUpdated`.
    Fhir {
        /// Base URL (`https://…/fhir`).
        base_url: String,
        /// Poll interval.
        #[serde(default = "default_poll")]
        poll_secs: u64,
        /// Overlap of each poll with the previous one, for clock skew and late commits.
        #[serde(default = "default_overlap")]
        overlap_secs: u64,
        /// Page size asked for (`_count`).
        #[serde(default = "default_page")]
        page_size: u32,
        /// Deletions: every poll reads the server's `_history` for deleted resources
        /// where it offers it; at least this often every known patient is read again
        /// whole, so a resource that vanished without a trace leaves devices within one
        /// interval (0: every poll).
        #[serde(default = "default_reconcile")]
        reconcile_secs: u64,
    },
}

/// Sensitive-data exclusions.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharingConfig {
    /// Code-list file (CSV with a `# version:` line); the shipped list if absent.
    #[serde(default)]
    pub code_list: Option<PathBuf>,
    /// Sensitivity labels (v3 ActCode) to withhold; the defaults if absent.
    #[serde(default)]
    pub deny_labels: Option<Vec<String>>,
    /// The region's map of local, Read v2 and CTV3 codes to SNOMED CT (CSV with a
    /// `# version:` line), so the code list also covers them.
    #[serde(default)]
    pub local_code_map: Option<PathBuf>,
    /// A clinical item no list can classify: `share` (default) or `withhold`.
    #[serde(default)]
    pub unclassified: crate::sharing::Unclassified,
}

/// Request limits.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Sustained requests per second per device.
    #[serde(default = "default_rps")]
    pub requests_per_second: u32,
    /// Burst allowance per device.
    #[serde(default = "default_burst")]
    pub burst: u32,
    /// Largest batch the hub sends, whatever a device asks (bytes).
    #[serde(default = "default_batch")]
    pub max_batch_bytes: u32,
    /// Seconds to finish reading request headers (slow clients are cut).
    #[serde(default = "default_header_timeout")]
    pub header_timeout_secs: u64,
    /// Memory for shared snapshots: batches built once and sent to every device of a
    /// team that asks for the same thing at the same log head (MiB; 0 turns them off).
    #[serde(default = "default_shared_mib")]
    pub shared_snapshot_mib: u64,
    /// How long a shared batch is served (seconds, 1–50: its hub time must stay within
    /// a device's replay tolerance of 60 s).
    #[serde(default = "default_shared_secs")]
    pub shared_snapshot_secs: u64,
    /// Length of the lease a one-off lookup grants (hours, 1–72).
    #[serde(default = "default_lookup_hours")]
    pub lookup_lease_hours: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            requests_per_second: default_rps(),
            burst: default_burst(),
            max_batch_bytes: default_batch(),
            header_timeout_secs: default_header_timeout(),
            shared_snapshot_mib: default_shared_mib(),
            shared_snapshot_secs: default_shared_secs(),
            lookup_lease_hours: default_lookup_hours(),
        }
    }
}

fn default_lookup_hours() -> u32 {
    12
}
fn default_shared_mib() -> u64 {
    256
}
fn default_shared_secs() -> u64 {
    30
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8443))
}
fn default_cert_days() -> i64 {
    365
}
fn default_poll() -> u64 {
    300
}
fn default_overlap() -> u64 {
    300
}
fn default_reconcile() -> u64 {
    3600
}
fn default_page() -> u32 {
    500
}
fn default_rps() -> u32 {
    20
}
fn default_burst() -> u32 {
    60
}
fn default_batch() -> u32 {
    16 * 1024 * 1024
}
fn default_header_timeout() -> u64 {
    10
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this configuration (names the key).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with line and key.
        message: String,
    },
    /// A value is out of range.
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Read and check `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: Self = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), ConfigError> {
        if self.limits.requests_per_second == 0 || self.limits.burst == 0 {
            return Err(ConfigError::Invalid(
                "limits.requests_per_second and limits.burst must be at least 1".into(),
            ));
        }
        if self.limits.max_batch_bytes < sync_protocol::message::Pull::MIN_BUDGET {
            return Err(ConfigError::Invalid(
                "limits.max_batch_bytes must be at least 262144".into(),
            ));
        }
        if !(1..=50).contains(&self.limits.shared_snapshot_secs) {
            return Err(ConfigError::Invalid(
                "limits.shared_snapshot_secs must be 1 to 50 (a shared batch's hub time must stay within a device's 60 s replay tolerance)".into(),
            ));
        }
        if !(1..=72).contains(&self.limits.lookup_lease_hours) {
            return Err(ConfigError::Invalid(
                "limits.lookup_lease_hours must be 1 to 72".into(),
            ));
        }
        if !crate::store::postgres::valid_schema(&self.store.schema) {
            return Err(ConfigError::Invalid(
                "store.schema must be lower-case letters, digits and _, starting with a letter or _"
                    .into(),
            ));
        }
        if !(1..=256).contains(&self.store.pool_size) {
            return Err(ConfigError::Invalid(
                "store.pool_size must be 1 to 256".into(),
            ));
        }
        if !(8..=65536).contains(&self.store.cache_mib) {
            return Err(ConfigError::Invalid(
                "store.cache_mib must be 8 to 65536".into(),
            ));
        }
        if let Some(f) = &self.forward {
            if !(1..=1000).contains(&f.batch) {
                return Err(ConfigError::Invalid(
                    "forward.batch must be 1 to 1000".into(),
                ));
            }
            if !(1..=86_400).contains(&f.interval_secs) {
                return Err(ConfigError::Invalid(
                    "forward.interval_secs must be 1 to 86400".into(),
                ));
            }
            let uri = f.url.parse::<ureq::http::Uri>().ok();
            let ok = match uri.as_ref().map(|u| (u.scheme_str(), u.host())) {
                Some((Some("https"), Some(_))) => true,
                Some((Some("http"), Some(h))) => {
                    ["127.0.0.1", "localhost", "[::1]", "::1"].contains(&h)
                }
                _ => false,
            };
            if !ok {
                return Err(ConfigError::Invalid(
                    "forward.url must be https:// (http:// only to this machine): audit names patients".into(),
                ));
            }
        }
        if !(1..=3650).contains(&self.tls.device_cert_days) {
            return Err(ConfigError::Invalid(
                "tls.device_cert_days must be 1 to 3650".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(store: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.toml");
        std::fs::write(
            &path,
            format!(
                "data_dir = \"/var/lib/carecache-hub\"\n[tls]\nca_cert = \"ca.pem\"\n\
                 ca_key = \"ca.key\"\ncert = \"hub.pem\"\nkey = \"hub.key\"\n[source]\n\
                 kind = \"ndjson\"\npath = \"/srv/export\"\n{store}"
            ),
        )
        .unwrap();
        Config::load(&path)
    }

    #[test]
    fn audit_is_forwarded_only_over_tls_or_to_this_machine() {
        assert!(load("").unwrap().forward.is_none());
        let f = load("[forward]\nurl = \"https://audit.example.nhs.uk/fhir\"\n")
            .unwrap()
            .forward
            .unwrap();
        assert_eq!((f.batch, f.interval_secs), (200, 60));
        assert!(load("[forward]\nurl = \"http://127.0.0.1:8080/fhir\"\n").is_ok());
        for (bad, says) in [
            ("url = \"http://audit.example.nhs.uk/fhir\"", "https://"),
            ("url = \"http://127.0.0.1.example.com/fhir\"", "https://"),
            ("url = \"not a url\"", "https://"),
            (
                "url = \"https://a.example/fhir\"\nbatch = 0",
                "forward.batch",
            ),
            (
                "url = \"https://a.example/fhir\"\ninterval_secs = 0",
                "forward.interval_secs",
            ),
            (
                "url = \"https://a.example/fhir\"\npassword = \"x\"",
                "unknown field",
            ),
        ] {
            let err = load(&format!("[forward]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn the_store_is_redb_unless_postgres_is_chosen_with_a_url() {
        assert_eq!(load("").unwrap().store.kind, StoreKind::Redb);
        let pg = load(
            "[store]\nkind = \"postgres\"\nurl = \"postgresql://hub:secret-pw@db.internal/region\"\n\
             schema = \"north\"\npool_size = 16\n",
        )
        .unwrap();
        assert_eq!(pg.store.kind, StoreKind::Postgres);
        let opts = pg.store.postgres().unwrap();
        assert_eq!((opts.schema.as_str(), opts.pool_size), ("north", 16));
        // The password stays out of Debug output (logs).
        assert!(!format!("{:?} {opts:?}", pg.store).contains("secret-pw"));

        let no_url = load("[store]\nkind = \"postgres\"\n").unwrap();
        if std::env::var_os("CARECACHE_HUB_DATABASE_URL").is_none() {
            let err = no_url.store.postgres().unwrap_err().to_string();
            assert!(err.contains("CARECACHE_HUB_DATABASE_URL"), "{err}");
        }

        for (bad, says) in [
            ("[store]\nkind = \"sqlite\"\n", "kind"),
            (
                "[store]\nkind = \"postgres\"\nschema = \"North; DROP\"\n",
                "store.schema",
            ),
            (
                "[store]\nkind = \"postgres\"\npool_size = 0\n",
                "store.pool_size",
            ),
            ("[store]\ncache_mib = 1\n", "store.cache_mib"),
        ] {
            let err = load(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
