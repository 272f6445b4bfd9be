//! The `carecache` command. `main` only maps `run` to an exit code.
#![forbid(unsafe_code)]

use std::process::ExitCode;

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
    }
}
