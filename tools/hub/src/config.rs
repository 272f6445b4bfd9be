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
}

/// The hub's database (`[store]`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Page cache of the database, in MiB: the hub's memory beyond it stays flat whatever
    /// the region's size.
    #[serde(default = "default_cache_mib")]
    pub cache_mib: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            cache_mib: default_cache_mib(),
        }
    }
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
        if !(8..=65536).contains(&self.store.cache_mib) {
            return Err(ConfigError::Invalid(
                "store.cache_mib must be 8 to 65536".into(),
            ));
        }
        if !(1..=3650).contains(&self.tls.device_cert_days) {
            return Err(ConfigError::Invalid(
                "tls.device_cert_days must be 1 to 3650".into(),
            ));
        }
        Ok(())
    }
}
