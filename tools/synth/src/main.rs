//! `carecache-synth`: write a synthetic shared care record as FHIR R4 Bulk Data NDJSON.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

/// Write N synthetic patients (test-range NHS numbers, SNOMED CT and dm+d codes) as FHIR
/// R4 NDJSON, one file per resource type, as a FHIR Bulk Data export does.
#[derive(Parser, Debug)]
#[command(name = "carecache-synth", version)]
struct Args {
    /// How many patients.
    #[arg(long, default_value_t = 2000)]
    patients: usize,
    /// Seed: the same seed always writes the same files.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Directory to write into (created if missing).
    #[arg(long)]
    out: PathBuf,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("carecache-synth: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    // One patient at a time: an export of a region's size is never held in memory.
    let mut generator = carecache_synth::Generator::new(args.seed);
    let context = || format!("writing NDJSON into {}", args.out.display());
    let mut out = carecache_synth::fhir::NdjsonWriter::create(&args.out).with_context(context)?;
    for i in 0..args.patients {
        out.add(&generator.source_patient(i))
            .with_context(context)?;
    }
    let counts = out.finish().with_context(context)?;
    for (kind, n) in counts {
        eprintln!("{kind}.ndjson: {n} resources");
    }
    Ok(())
}
