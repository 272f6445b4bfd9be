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
    /// Retention (PostgreSQL): drop the audit stored more than N whole months before this
    /// one — a partition drop per month, never a month holding entries not yet forwarded
    /// upstream when `[forward]` is set — and change-log partitions compaction emptied.
    /// Prints what was dropped as JSON.
    Retention {
        /// Configuration file.
        #[arg(long, default_value = "hub.toml")]
        config: PathBuf,
        /// Whole months of audit kept before the current one (at least 1).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        keep_audit_months: u32,
    },
    /// Audit held by the hub.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

/// Where an audit command reads: the running hub's admin API, or the database itself.
#[derive(clap::Args, Debug)]
struct Reach {
    /// Configuration file.
    #[arg(long, default_value = "hub.toml")]
    config: PathBuf,
    /// The running hub (e.g. https://hub.example:8443). Default: the config's listen
    /// address; when nothing answers there the database is read directly (a redb hub
    /// must then be stopped).
    #[arg(long)]
    hub: Option<String>,
    /// The CA that issued the hub's TLS certificate (default: tls.ca_cert).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Who is acting: kept in the officers' log with what was done.
    #[arg(long, env = "CARECACHE_OFFICER")]
    officer: String,
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// For the privacy officer: devices whose audit chain broke, and every emergency
    /// (ETREAT) access with the clinician's reason.
    Review {
        #[command(flatten)]
        reach: Reach,
        /// FHIR AuditEvent NDJSON instead of text.
        #[arg(long)]
        ndjson: bool,
    },
    /// Every access to one patient's record, on every device, oldest first (for a
    /// complaint or a subject access request).
    Patient {
        /// The patient's NHS number (spaces allowed).
        nhs_number: String,
        #[command(flatten)]
        reach: Reach,
        /// FHIR AuditEvent NDJSON instead of text.
        #[arg(long)]
        ndjson: bool,
    },
    /// Write every entry as FHIR AuditEvent NDJSON (IHE BALP read pattern).
    Export {
        #[command(flatten)]
        reach: Reach,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Clear a device's audit flag after looking into the break: its next entries are
    /// accepted again. Needs a reason; kept in the officers' log.
    ClearFlag {
        /// The device id.
        device: String,
        /// What was looked into (10–1000 characters).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        reach: Reach,
    },
    /// What privacy officers did through the hub (views and clearances), as JSON lines.
    OfficerLog {
        #[command(flatten)]
        reach: Reach,
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
        Command::Audit { command } => audit_command(command),
        Command::Retention {
            config,
            keep_audit_months,
        } => {
            let config = Config::load(&config)?;
            let state = open_state(&config)?;
            let done = state.retain(keep_audit_months, config.forward.is_some())?;
            std::io::Write::write_all(
                &mut std::io::stdout().lock(),
                format!("{}\n", serde_json::to_string(&done)?).as_bytes(),
            )?;
            if !done.kept_unforwarded.is_empty() {
                eprintln!(
                    "kept {} month(s) old enough to drop: they hold audit not yet forwarded upstream",
                    done.kept_unforwarded.len()
                );
            }
            Ok(())
        }
    }
}

/// How an audit command reaches the hub's audit.
enum Via {
    /// The running hub's admin API.
    Hub {
        agent: ureq::Agent,
        base: String,
        token: String,
        officer: String,
    },
    /// The database, the hub stopped (or PostgreSQL, shared).
    Store {
        state: HubState,
        officer: carecache_hub::officer::Officer,
    },
}

impl Via {
    fn new(reach: &Reach) -> anyhow::Result<Self> {
        let config = Config::load(&reach.config)?;
        let base = match &reach.hub {
            Some(url) => Some(url.trim_end_matches('/').to_owned()),
            None => {
                // A hub listening on every address is reached on loopback.
                let mut addr = config.listen;
                if addr.ip().is_unspecified() {
                    addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                    .is_ok()
                    .then(|| format!("https://{addr}"))
            }
        };
        let Some(base) = base else {
            let officer = carecache_hub::officer::Officer::new(&reach.officer, "cli")?;
            return Ok(Via::Store {
                state: open_state(&config)?,
                officer,
            });
        };
        let token = token_from(
            "CARECACHE_HUB_PRIVACY_TOKEN",
            config.privacy_officer_token_file.as_deref(),
            "privacy officer",
        )?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "the hub at {base} is running: its audit needs the privacy officer's token (CARECACHE_HUB_PRIVACY_TOKEN or privacy_officer_token_file)"
            )
        })?;
        let ca = reach.ca.as_ref().unwrap_or(&config.tls.ca_cert);
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        Ok(Via::Hub {
            agent: carecache_hub::pki::agent_trusting(&pem)?,
            base,
            token,
            officer: reach.officer.trim().to_owned(),
        })
    }

    /// A request to the running hub's admin API (a POST of `body`, else a GET), its
    /// status checked.
    fn call(
        agent: &ureq::Agent,
        base: &str,
        token: &str,
        officer: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<ureq::http::Response<ureq::Body>> {
        let url = format!("{base}{path}");
        let auth = format!("Bearer {token}");
        let resp = match body {
            Some(b) => agent
                .post(&url)
                .header("authorization", &auth)
                .header("content-type", "application/json")
                .send(&serde_json::to_vec(&b)?),
            None => agent
                .get(&url)
                .header("authorization", &auth)
                .header(carecache_hub::server::OFFICER_HEADER, officer)
                .call(),
        };
        let mut resp = resp.with_context(|| format!("reaching the hub at {base}"))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let text = resp.body_mut().read_to_string().unwrap_or_default();
            #[derive(serde::Deserialize)]
            struct Refusal {
                error: String,
            }
            let message = serde_json::from_str::<Refusal>(&text).map_or(text, |r| r.error);
            bail!("the hub answered {status}: {message}");
        }
        Ok(resp)
    }

    fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let Via::Hub {
            agent,
            base,
            token,
            officer,
        } = self
        else {
            bail!("not reaching a running hub");
        };
        let text = Self::call(agent, base, token, officer, path, None)?
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_string()?;
        Ok(serde_json::from_str(&text)?)
    }
}

/// An audit entry to print: its text line and its AuditEvent.
#[derive(serde::Deserialize)]
struct Shown {
    device: String,
    text: String,
    event: serde_json::Value,
}

impl Shown {
    fn of(e: &carecache_hub::audit::StoredEntry) -> Self {
        Shown {
            device: e.device.clone(),
            text: carecache_hub::export::describe(e),
            event: carecache_hub::export::audit_event(e),
        }
    }

    fn print(&self, out: &mut impl std::io::Write, ndjson: bool) -> std::io::Result<()> {
        if ndjson {
            serde_json::to_writer(&mut *out, &self.event)?;
            out.write_all(b"\n")
        } else {
            writeln!(out, "  {}", self.text)
        }
    }
}

/// The admin API's answers, as the commands read them.
#[derive(serde::Deserialize)]
struct ReviewAnswer {
    flagged: Vec<FlagAnswer>,
    emergency: Vec<Shown>,
}

#[derive(serde::Deserialize)]
struct FlagAnswer {
    device: String,
    broken_at: u64,
}

#[derive(serde::Deserialize)]
struct HistoryAnswer {
    accesses: Vec<Shown>,
}

#[derive(serde::Deserialize)]
struct LogAnswer {
    entries: Vec<serde_json::Value>,
}

fn audit_command(command: AuditCommand) -> anyhow::Result<()> {
    use std::io::Write;
    let now = system_clock();
    match command {
        AuditCommand::Review { reach, ndjson } => {
            let via = Via::new(&reach)?;
            let (flagged, shown) = match &via {
                Via::Store { state, officer } => {
                    let r = state.review(officer, now)?;
                    (r.flagged, r.emergency.iter().map(Shown::of).collect())
                }
                Via::Hub { .. } => {
                    let r: ReviewAnswer = via.get_json("/admin/v1/audit/review")?;
                    let flagged = r.flagged.into_iter().map(|f| (f.device, f.broken_at));
                    (flagged.collect(), r.emergency)
                }
            };
            let mut out = std::io::stdout().lock();
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
            for s in &shown {
                s.print(&mut out, ndjson)?;
            }
            if !ndjson {
                writeln!(out, "{} emergency accesses", shown.len())?;
            }
            out.flush()?;
        }
        AuditCommand::Patient {
            nhs_number,
            reach,
            ndjson,
        } => {
            let nhs = sync_protocol::NhsNumber::parse(&nhs_number).map_err(|_| {
                anyhow::anyhow!("not a valid NHS number (10 digits, Modulus 11 check)")
            })?;
            let via = Via::new(&reach)?;
            let shown: Vec<Shown> = match &via {
                Via::Store { state, officer } => state
                    .patient_history(officer, nhs, now)?
                    .iter()
                    .map(Shown::of)
                    .collect(),
                Via::Hub { .. } => {
                    let path = format!("/admin/v1/audit/patients/{}", nhs.digits());
                    via.get_json::<HistoryAnswer>(&path)?.accesses
                }
            };
            let mut out = std::io::stdout().lock();
            if !ndjson {
                writeln!(
                    out,
                    "Accesses to the record of NHS number {nhs}, oldest first:"
                )?;
            }
            let devices: std::collections::BTreeSet<&str> =
                shown.iter().map(|s| s.device.as_str()).collect();
            for s in &shown {
                s.print(&mut out, ndjson)?;
            }
            if !ndjson {
                writeln!(
                    out,
                    "{} accesses from {} devices",
                    shown.len(),
                    devices.len()
                )?;
            }
            out.flush()?;
        }
        AuditCommand::Export { reach, out } => {
            let via = Via::new(&reach)?;
            let tmp = out.with_extension("partial");
            let mut w = std::io::BufWriter::new(
                std::fs::File::create(&tmp)
                    .with_context(|| format!("creating {}", tmp.display()))?,
            );
            let n = match &via {
                Via::Store { state, officer } => state.export_audit(officer, now, |e| {
                    serde_json::to_writer(&mut w, &carecache_hub::export::audit_event(&e))?;
                    w.write_all(b"\n")
                })?,
                Via::Hub {
                    agent,
                    base,
                    token,
                    officer,
                } => {
                    let mut resp =
                        Via::call(agent, base, token, officer, "/admin/v1/audit/export", None)?;
                    let mut body = resp.body_mut().with_config().limit(u64::MAX).reader();
                    std::io::copy(&mut body, &mut w)
                        .context("the export broke off before its end")?;
                    w.flush()?;
                    std::fs::read(&tmp)?.iter().filter(|&&b| b == b'\n').count() as u64
                }
            };
            w.flush()?;
            w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            std::fs::rename(&tmp, &out).with_context(|| format!("writing {}", out.display()))?;
            eprintln!("exported {n} audit events to {}", out.display());
        }
        AuditCommand::ClearFlag {
            device,
            reason,
            reach,
        } => {
            let via = Via::new(&reach)?;
            let at = match &via {
                Via::Store { state, officer } => {
                    state.clear_audit_flag(&device, officer, &reason, now)?
                }
                Via::Hub {
                    agent,
                    base,
                    token,
                    officer,
                } => {
                    let path = format!("/admin/v1/devices/{device}/clear-audit-flag");
                    let body = serde_json::json!({ "officer": officer, "reason": reason });
                    let text = Via::call(agent, base, token, officer, &path, Some(body))?
                        .body_mut()
                        .read_to_string()?;
                    serde_json::from_str::<FlagAnswer>(&text)?.broken_at
                }
            };
            eprintln!(
                "audit flag of {device} cleared (its chain had broken at sequence {at}); its next entries are accepted"
            );
        }
        AuditCommand::OfficerLog { reach } => {
            let via = Via::new(&reach)?;
            let log: Vec<serde_json::Value> = match &via {
                Via::Store { state, .. } => state
                    .officer_log()?
                    .iter()
                    .map(|(seq, l)| l.to_json(*seq))
                    .collect(),
                Via::Hub { .. } => {
                    via.get_json::<LogAnswer>("/admin/v1/audit/officer-log")?
                        .entries
                }
            };
            let mut out = std::io::stdout().lock();
            for l in &log {
                serde_json::to_writer(&mut out, l)?;
                out.write_all(b"\n")?;
            }
            out.flush()?;
        }
    }
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
    let hub = match token_from(
        "CARECACHE_HUB_METRICS_TOKEN",
        config.metrics_token_file.as_deref(),
        "metrics",
    )? {
        Some(t) if t == token => bail!("the metrics token must differ from the admin token"),
        Some(t) => hub.with_metrics_token(&t),
        None => hub,
    };
    let hub = Arc::new(hub);

    let source = config.source.clone();
    let ingest_hub = Arc::downgrade(&hub);
    let ingest_rules = rules.clone();
    hub.set_ingest_hook(Arc::new(move || match ingest_hub.upgrade() {
        Some(hub) => ingest_once(&source, &hub.state, &ingest_rules),
        None => Err("the hub is stopping".to_owned()),
    }));
    if let Some(Err(e)) = hub.run_ingest() {
        tracing::error!(error = %e, "initial ingest failed; serving what the database holds");
    }
    let poll_secs = match &config.source {
        SourceConfig::Ndjson { poll_secs, .. } | SourceConfig::Fhir { poll_secs, .. } => *poll_secs,
    };

    let forwarder = match &config.forward {
        Some(f) => {
            let ca = f
                .ca_file
                .as_ref()
                .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
                .transpose()?;
            let token = token_from(
                "CARECACHE_HUB_FORWARD_TOKEN",
                f.token_file.as_deref(),
                "forward",
            )?;
            let forwarder =
                carecache_hub::forward::Forwarder::new(&f.url, ca.as_deref(), token, f.batch)?;
            tracing::info!(
                every_secs = f.interval_secs,
                "audit forwarded upstream as FHIR AuditEvent"
            );
            Some((Arc::new(forwarder), f.interval_secs))
        }
        None => None,
    };

    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        if let Some((forwarder, every)) = forwarder {
            let hub = hub.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(every));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let (h, f) = (hub.clone(), forwarder.clone());
                    let _ = tokio::task::spawn_blocking(move || h.run_forward(&f)).await;
                }
            });
        }
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
                    if let Err(e) = h.state.maintain() {
                        tracing::error!(error = %e, "database housekeeping failed");
                    }
                })
                .await;
                since_poll += 60;
                if poll_secs > 0 && since_poll >= poll_secs {
                    since_poll = 0;
                    let h = housekeeping_hub.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        if let Some(Err(e)) = h.run_ingest() {
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
