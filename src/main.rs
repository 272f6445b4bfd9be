//! The `carecache` command. `main` only maps `run` to an exit code.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use carecache::cli::{self, DataDirArgs, KdfArgs, KeyArgs, NewKeyArgs};
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
    /// Destroy the keys, then the data, of a data directory.
    Wipe {
        #[command(flatten)]
        dir: DataDirArgs,
        /// Do not ask for confirmation (for scripts).
        #[arg(long)]
        yes: bool,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("carecache: {e:#}");
            ExitCode::FAILURE
        }
    }
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
    }
}
