//! The `carecache` command. `main` only maps `run` to an exit code.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use carecache::admin::Request;
use carecache::cli::{self, DataDirArgs, KdfArgs, KeyArgs, NewKeyArgs};
use carecache::daemon;
use clap::Parser;

/// Offline-first, encrypted, view-only cache of patients' alerts, allergies and
/// medications for ambulance crews and district nurses.
#[derive(Debug, Parser)]
#[command(name = "carecache", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Run the whole system on this machine: a hub with synthetic patients, this daemon
    /// on loopback TLS, a caseload and a client token; prints the viewer URL and curl
    /// commands. Ctrl-C stops it and removes its data.
    #[cfg(feature = "demo")]
    Demo {
        /// Synthetic patients to generate (test-range NHS numbers).
        #[arg(long, default_value_t = 2000)]
        patients: usize,
        /// Seed of the synthetic data: the same seed gives the same people.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Local API port on 127.0.0.1 (0: any free port).
        #[arg(long, default_value_t = 8780)]
        port: u16,
        /// Stop as soon as everything is ready (scripts, CI).
        #[arg(long)]
        exit_after_ready: bool,
    },
    /// Check an NHS number (format and Modulus 11) and print it in 3-3-4 form.
    CheckNhsNumber {
        /// Ten digits; spaces and hyphens are ignored.
        number: String,
    },
    /// Create a data directory: keyring and empty encrypted store.
    Init {
        #[command(flatten)]
        dir: DataDirArgs,
        #[command(flatten)]
        key: KeyArgs,
        #[command(flatten)]
        kdf: KdfArgs,
    },
    /// Rotate the root key (no record is re-encrypted; the old key stops working).
    Rekey {
        #[command(flatten)]
        dir: DataDirArgs,
        #[command(flatten)]
        key: KeyArgs,
        #[command(flatten)]
        new: NewKeyArgs,
        #[command(flatten)]
        kdf: KdfArgs,
    },
    /// Enrol this device with the hub using a one-time token from its administrator.
    Enrol {
        #[command(flatten)]
        config: ConfigArg,
        /// The enrolment token (or $CARECACHE_ENROL_TOKEN).
        #[arg(long, env = "CARECACHE_ENROL_TOKEN", hide_env_values = true)]
        token: String,
        /// Re-certify this enrolled device with a renewal token (its certificate ended
        /// before it could renew); it keeps its id, data and audit.
        #[arg(long)]
        renew: bool,
    },
    /// Run one sync round now (progress on a terminal).
    Sync {
        #[command(flatten)]
        config: ConfigArg,
        /// Also print time, bytes and peak memory.
        #[arg(long)]
        stats: bool,
    },
    /// List the leases held: label, view, patients, standing and time left.
    Leases {
        #[command(flatten)]
        config: ConfigArg,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show leases and time left, last sync and its error, trusted time, audit backlog.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Run the daemon: the policy tick and the sync loop, until SIGINT or SIGTERM.
    Serve {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Register, list or revoke the crew software allowed to use the local API.
    Clients {
        #[command(flatten)]
        config: ConfigArg,
        #[command(subcommand)]
        action: ClientsCommand,
    },
    /// Check, export or read the audit trail this device holds.
    Audit {
        #[command(flatten)]
        config: ConfigArg,
        #[command(subcommand)]
        action: AuditCommand,
    },
    /// Destroy the keys, then the data, of a data directory.
    Wipe {
        #[command(flatten)]
        dir: DataDirArgs,
        /// Do not ask for confirmation (for scripts).
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, clap::Subcommand)]
enum ClientsCommand {
    /// Register a client and print its token (shown once; only its hash is kept).
    Add {
        /// A name for the client software, e.g. `epcr-tablet`.
        name: String,
    },
    /// List registrations (names and dates; tokens are never shown again).
    List,
    /// Revoke a registration: its token is refused from now on.
    Revoke {
        /// The client's name.
        name: String,
    },
}

#[derive(Debug, clap::Subcommand)]
enum AuditCommand {
    /// Check the hash chain of the entries held; exit non-zero naming the first bad
    /// sequence.
    Verify,
    /// Write the entries held as FHIR AuditEvent NDJSON (IHE BALP).
    Export {
        /// Output file (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Show the last entries, one line each (patients by NHS number only).
    Tail {
        /// How many.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: u64,
    },
}

/// The configuration file.
#[derive(Debug, clap::Args)]
struct ConfigArg {
    /// Path of carecache.toml.
    #[arg(
        long,
        global = true,
        env = "CARECACHE_CONFIG",
        default_value = "/etc/carecache/carecache.toml"
    )]
    config: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon logs what it does; one-shot commands only warnings. Logs carry ids,
    // counts and outcomes, never patient data.
    let default = if matches!(cli.command, Command::Serve { .. }) {
        "info"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CARECACHE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("carecache: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn stdout() -> std::io::StdoutLock<'static> {
    std::io::stdout().lock()
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::CheckNhsNumber { number } => {
            let n = sync_protocol::NhsNumber::parse(&number).map_err(|_| {
                anyhow::anyhow!("not a valid NHS number (10 digits, Modulus 11 check)")
            })?;
            #[allow(clippy::print_stdout)] // The command's output.
            {
                println!("{n}");
            }
            Ok(())
        }
        Command::Init { dir, key, kdf } => cli::init(&dir, &key, &kdf),
        Command::Rekey { dir, key, new, kdf } => cli::rekey(&dir, &key, &new, &kdf),
        Command::Wipe { dir, yes } => cli::wipe(&dir, yes),
        Command::Enrol {
            config,
            token,
            renew,
        } => daemon::enrol(&config.config, &token, renew),
        Command::Sync { config, stats } => daemon::sync(&config.config, stats),
        Command::Status { config, json } => {
            daemon::command(&config.config, &Request::Status { json }, &mut stdout())
        }
        Command::Leases { config, json } => {
            daemon::command(&config.config, &Request::Leases { json }, &mut stdout())
        }
        Command::Serve { config } => daemon::serve(&config.config),
        #[cfg(feature = "demo")]
        Command::Demo {
            patients,
            seed,
            port,
            exit_after_ready,
        } => carecache::demo::run(&carecache::demo::Options {
            patients,
            seed,
            port,
            exit_after_ready,
        }),
        Command::Audit { config, action } => match action {
            AuditCommand::Verify => {
                daemon::command(&config.config, &Request::AuditVerify, &mut stdout())
            }
            AuditCommand::Tail { lines } => {
                daemon::command(&config.config, &Request::AuditTail { lines }, &mut stdout())
            }
            AuditCommand::Export { out: None } => {
                daemon::command(&config.config, &Request::AuditExport, &mut stdout())
            }
            AuditCommand::Export { out: Some(path) } => {
                let file = std::fs::File::create(&path)
                    .map_err(|e| anyhow::anyhow!("creating {}: {e}", path.display()))?;
                let mut file = std::io::BufWriter::new(file);
                daemon::command(&config.config, &Request::AuditExport, &mut file)?;
                std::io::Write::flush(&mut file)
                    .and_then(|()| file.get_ref().sync_all())
                    .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
                eprintln!("written to {}", path.display());
                Ok(())
            }
        },
        Command::Clients { config, action } => daemon::command(
            &config.config,
            &match action {
                ClientsCommand::Add { name } => Request::ClientsAdd { name },
                ClientsCommand::List => Request::ClientsList,
                ClientsCommand::Revoke { name } => Request::ClientsRevoke { name },
            },
            &mut stdout(),
        ),
    }
}
