//! `carecache-hub`: serve the sync protocol, make a development CA, export audit.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use carecache_hub::config::{Config, SourceConfig, StoreKind};
use carecache_hub::pki::{DeviceCa, dev_ca};
use carecache_hub::server::{Hub, serve, system_clock, tls_from_files};
use carecache_hub::sharing::{DEFAULT_DENY_LABELS, SharingRules};
use carecache_hub::source::{FhirRest, ingest_ndjson};
use carecache_hub::state::HubState;
use clap::{Parser, Subcommand};

/// The reference carecache hub.
#[derive(Parser, Debug)]
#[command(name = "carecache-hub", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the sync protocol and the admin API.
    Serve {
        /// Configuration file.
        #[arg(long, default_value = "hub.toml")]
        config: PathBuf,
    },
    /// Read the configured source once into the database and exit (a scheduled import,
    /// or a first load before `serve`); prints the ingest summary as JSON. The hub must
    /// not be running.
    Ingest {
        /// Configuration file.
        #[arg(long, default_value = "hub.toml")]
        config: PathBuf,
    },
    /// Make a development CA and a hub certificate for loopback.
    DevCa {
        /// Directory to write ca.pem, ca.key, hub.pem, hub.key into.
        #[arg(long)]
        out: PathBuf,
        /// Host names and addresses the hub certificate covers.
        #[arg(long = "host", default_values_t = ["localhost".to_owned(), "127.0.0.1".to_owned()])]
        hosts: Vec<String>,
    },
    /// Audit held by the hub.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// For the privacy officer: devices whose audit chain broke, and every emergency
    /// (ETREAT) access with the clinician's reason.
    Review {
        /// Configuration file (for the data directory; the hub must not be running).
        #[arg(long, default_value = "hub.toml")]
        config: PathBuf,
        /// FHIR AuditEvent NDJSON instead of text.
        #[arg(long)]
        ndjson: bool,
    },
    /// Every access to one patient's record, on every device, oldest first (for a
    /// complaint or a subject access request).
    Patient {
        /// The patient's NHS number (spaces allowed).
        nhs_number: String,
        /// Configuration file (for the data directory; the hub must not be running).
        #[arg(long, default_value = "hub.toml")]
        config: PathBuf,
        /// FHIR AuditEvent NDJSON instead of text.
        #[arg(long)]
        ndjson: bool,
    },
    /// Write every entry as FHIR AuditEvent NDJSON (IHE BALP read pattern).
    Export {
        /// Configuration file (for the data directory; the hub must not be running).
        #[arg(long, default_value = "hub.toml")]
        config: PathBuf,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("carecache-hub: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::DevCa { out, hosts } => {
            let files = dev_ca(&out, &hosts)?;
            eprintln!(
                "wrote {}, {}, {}, {}",
                files.ca_cert.display(),
                files.ca_key.display(),
                files.hub_cert.display(),
                files.hub_key.display()
            );
            Ok(())
        }
        Command::Serve { config } => serve_main(&Config::load(&config)?),
        Command::Ingest { config } => {
            let config = Config::load(&config)?;
            let state = open_state(&config)?;
            let summary = ingest_once(&config.source, &state, &sharing_rules(&config)?)
                .map_err(anyhow::Error::msg)?;
            std::io::Write::write_all(
                &mut std::io::stdout().lock(),
                format!("{summary}\n").as_bytes(),
            )?;
            Ok(())
        }
        Command::Audit {
            command: AuditCommand::Review { config, ndjson },
        } => review(&open_state(&Config::load(&config)?)?, ndjson),
        Command::Audit {
            command:
                AuditCommand::Patient {
                    nhs_number,
                    config,
                    ndjson,
                },
        } => {
            let nhs = sync_protocol::NhsNumber::parse(&nhs_number).map_err(|_| {
                anyhow::anyhow!("not a valid NHS number (10 digits, Modulus 11 check)")
            })?;
            patient(&open_state(&Config::load(&config)?)?, nhs, ndjson)
        }
        Command::Audit {
            command: AuditCommand::Export { config, out },
        } => {
            let config = Config::load(&config)?;
            let state = open_state(&config)?;
            let mut w = std::io::BufWriter::new(
                std::fs::File::create(&out)
                    .with_context(|| format!("creating {}", out.display()))?,
            );
            let n = state.for_each_audit(|e| {
                use std::io::Write;
                serde_json::to_writer(&mut w, &carecache_hub::export::audit_event(&e))?;
                w.write_all(b"\n")
            })?;
            use std::io::Write;
            w.flush()?;
            eprintln!("exported {n} audit events to {}", out.display());
            Ok(())
        }
    }
}

/// One entry to standard output, as text or as an AuditEvent line.
fn print_entry(
    out: &mut impl std::io::Write,
    e: &carecache_hub::audit::StoredEntry,
    ndjson: bool,
) -> std::io::Result<()> {
    if ndjson {
        serde_json::to_writer(&mut *out, &carecache_hub::export::audit_event(e))?;
        out.write_all(b"\n")
    } else {
        writeln!(out, "  {}", carecache_hub::export::describe(e))
    }
}

fn review(state: &HubState, ndjson: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let flagged = state.flagged_devices()?;
    let mut text = String::new();
    if flagged.is_empty() {
        text.push_str("No device is flagged: every audit chain received verifies.\n");
    } else {
        text.push_str("Devices flagged for review (audit chain broken; nothing after the break is accepted):\n");
        for (device, at) in &flagged {
            text.push_str(&format!("  {device}  broken at sequence {at}\n"));
        }
    }
    if ndjson {
        eprint!("{text}");
    } else {
        write!(out, "{text}")?;
        writeln!(out, "Emergency (ETREAT) accesses to review:")?;
    }
    let n = state.for_each_emergency(|e| print_entry(&mut out, &e, ndjson))?;
    if !ndjson {
        writeln!(out, "{n} emergency accesses")?;
    }
    out.flush()?;
    Ok(())
}

fn patient(state: &HubState, nhs: sync_protocol::NhsNumber, ndjson: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if !ndjson {
        writeln!(
            out,
            "Accesses to the record of NHS number {nhs}, oldest first:"
        )?;
    }
    let mut devices = std::collections::BTreeSet::new();
    let n = state.for_each_patient_access(nhs, |e| {
        devices.insert(e.device.clone());
        print_entry(&mut out, &e, ndjson)
    })?;
    if !ndjson {
        writeln!(out, "{n} accesses from {} devices", devices.len())?;
    }
    out.flush()?;
    Ok(())
}

fn open_state(config: &Config) -> anyhow::Result<HubState> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    let state = match config.store.kind {
        StoreKind::Redb => {
            let cache = usize::try_from(config.store.cache_mib).unwrap_or(64) * 1024 * 1024;
            HubState::open_with_cache(&config.data_dir.join("hub.redb"), cache).with_context(|| {
                format!(
                    "opening the hub database in {} (is another hub running?)",
                    config.data_dir.display()
                )
            })
        }
        StoreKind::Postgres => {
            let opts = config.store.postgres()?;
            HubState::open_postgres(&opts, &config.data_dir).with_context(|| {
                format!(
                    "opening the hub database in PostgreSQL (schema {})",
                    opts.schema
                )
            })
        }
    }?;
    tracing::info!(store = %state.describe(), "hub state opened");
    Ok(state)
}

fn admin_token(config: &Config) -> anyhow::Result<String> {
    token_from(
        "CARECACHE_HUB_ADMIN_TOKEN",
        config.admin_token_file.as_deref(),
        "admin",
    )?
    .ok_or_else(|| {
        anyhow::anyhow!(
            "no admin token: set admin_token_file in the config or CARECACHE_HUB_ADMIN_TOKEN"
        )
    })
}

/// A token from the environment variable `env`, else the first line of `file`.
fn token_from(
    env: &str,
    file: Option<&std::path::Path>,
    what: &str,
) -> anyhow::Result<Option<String>> {
    if let Ok(t) = std::env::var(env)
        && !t.is_empty()
    {
        return Ok(Some(t));
    }
    let Some(path) = file else {
        return Ok(None);
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_owned();
    if token.len() < 16 {
        bail!(
            "{what} token in {} is shorter than 16 characters",
            path.display()
        );
    }
    Ok(Some(token))
}

/// The sharing rules the config names (code list, denied labels, local code map).
fn sharing_rules(config: &Config) -> anyhow::Result<SharingRules> {
    let labels: Vec<String> = config.sharing.deny_labels.clone().unwrap_or_else(|| {
        DEFAULT_DENY_LABELS
            .iter()
            .map(|s| (*s).to_owned())
            .collect()
    });
    let mut rules = match &config.sharing.code_list {
        Some(p) => SharingRules::from_file(p, &labels)?,
        None => SharingRules::new(carecache_hub::sharing::DEFAULT_CODE_LIST, &labels)?,
    }
    .with_unclassified(config.sharing.unclassified);
    if let Some(path) = &config.sharing.local_code_map {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the local code map {}", path.display()))?;
        rules = rules.with_local_map(carecache_hub::sharing::LocalCodeMap::parse(&text)?);
    }
    Ok(rules)
}

/// One read of `source` into `state`: its summary as JSON.
fn ingest_once(
    source: &SourceConfig,
    state: &HubState,
    rules: &SharingRules,
) -> Result<serde_json::Value, String> {
    let summary = match source {
        SourceConfig::Ndjson { path, .. } => ingest_ndjson(state, rules, path),
        SourceConfig::Fhir {
            base_url,
            overlap_secs,
            page_size,
            reconcile_secs,
            ..
        } => FhirRest::new(base_url, *overlap_secs, *page_size)
            .with_reconcile(*reconcile_secs)
            .poll(state, rules),
    };
    summary
        .map(|s| serde_json::to_value(s).unwrap_or_default())
        .map_err(|e| e.to_string())
}

fn serve_main(config: &Config) -> anyhow::Result<()> {
    let token = admin_token(config)?;
    let rules = sharing_rules(config)?;
    let state = open_state(config)?;
    for spec in &config.leases {
        state.put_lease(spec, None).with_context(|| {
            format!(
                "lease {:?} in the config",
                spec.name.as_deref().unwrap_or(&spec.label)
            )
        })?;
    }
    let ca = DeviceCa::load(
        &config.tls.ca_cert,
        &config.tls.ca_key,
        config.tls.device_cert_days,
    )?;
    let tls = tls_from_files(&config.tls.ca_cert, &config.tls.cert, &config.tls.key)
        .map_err(anyhow::Error::msg)?;
    let hub = Hub::new(state, ca, &token, &config.limits).with_fleet(config.fleet.clone());
    let hub = match token_from(
        "CARECACHE_HUB_PRIVACY_TOKEN",
        config.privacy_officer_token_file.as_deref(),
        "privacy officer",
    )? {
        Some(t) if t == token => {
            bail!("the privacy officer's token must differ from the admin token")
        }
        Some(t) => hub.with_privacy_officer_token(&t),
        None => hub,
    };
    let hub = Arc::new(hub);

    let source = config.source.clone();
    let ingest_hub = hub.clone();
    let ingest_rules = rules.clone();
    let ingest = Arc::new(move || ingest_once(&source, &ingest_hub.state, &ingest_rules));
    hub.set_ingest_hook(ingest.clone());
    if let Err(e) = ingest() {
        tracing::error!(error = %e, "initial ingest failed; serving what the database holds");
    }
    let poll_secs = match &config.source {
        SourceConfig::Ndjson { poll_secs, .. } | SourceConfig::Fhir { poll_secs, .. } => *poll_secs,
    };

    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        tracing::info!(listen = %config.listen, "hub serving");
        let housekeeping_hub = hub.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            let mut since_poll = 0u64;
            loop {
                tick.tick().await;
                let h = housekeeping_hub.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    if let Err(e) = h.state.expire_leases(system_clock()) {
                        tracing::error!(error = %e, "lease expiry sweep failed");
                    }
                })
                .await;
                since_poll += 60;
                if poll_secs > 0 && since_poll >= poll_secs {
                    since_poll = 0;
                    let ingest = ingest.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        if let Err(e) = ingest() {
                            tracing::error!(error = %e, "source poll failed");
                        }
                    })
                    .await;
                }
            }
        });
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down");
        };
        serve(
            hub,
            listener,
            tls,
            Duration::from_secs(config.limits.header_timeout_secs),
            shutdown,
        )
        .await?;
        Ok(())
    })
}
