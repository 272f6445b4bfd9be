//! One row of the benchmark suite's table (`scripts/bench-suite`): when
//! `CARECACHE_BENCH_TABLE` names a file, each benchmark appends its headline figures
//! there as tab-separated `measure, figure, baseline, ratio, goal, verdict`; the script
//! prints them as one table. Without the variable nothing is written.

use std::io::Write;

/// Appends one row. `pass` is `None` where there is no goal to meet.
pub(crate) fn row(
    measure: &str,
    figure: &str,
    baseline: &str,
    ratio: &str,
    goal: &str,
    pass: Option<bool>,
) {
    let Ok(path) = std::env::var("CARECACHE_BENCH_TABLE") else {
        return;
    };
    let verdict = match pass {
        Some(true) => "pass",
        Some(false) => "short",
        None => "—",
    };
    let line = [measure, figure, baseline, ratio, goal, verdict].join("\t");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("opening {path}: {e}"));
    writeln!(f, "{line}").unwrap_or_else(|e| panic!("writing {path}: {e}"));
}
