//! The sensitive code list of the sharing agreement: items coded with any of these
//! SNOMED CT / dm+d concepts (under either system: dm+d ids are SCTIDs) never reach a
//! device. The hub withholds them at ingest; the
//! device refuses any batch that carries one (defence in depth, DESIGN.md invariant 5).
//! Both sides read the same data file, `data/sensitive-codes.csv`.

use std::collections::BTreeSet;

use crate::record::PatientRecord;
use crate::types::{Coding, SctId};

/// The code list shipped with carecache (data, reviewed by the clinical safety officer).
pub const DEFAULT_CODE_LIST: &str = include_str!("../data/sensitive-codes.csv");

/// A code list that cannot be used (the operator's file is at fault).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("sensitive code list, line {line}: {reason}")]
pub struct CodeListError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub reason: &'static str,
}

/// A parsed, versioned code list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodeList {
    version: String,
    codes: BTreeSet<u64>,
}

impl CodeList {
    /// Parses CSV text: `#` comment lines (one of them `# version: …`), then the header
    /// `code,area,term,status`, then one concept per line. Every code must pass the SNOMED
    /// CT check digit; the list must have a version and at least one code.
    pub fn parse(text: &str) -> Result<Self, CodeListError> {
        let (version, rows) = versioned_csv(
            text,
            "code,",
            "expected the header line `code,area,term,status`",
        )?;
        let mut codes = BTreeSet::new();
        for (line, row) in rows {
            let err = |reason| CodeListError { line, reason };
            let code = row.split(',').next().unwrap_or("");
            let code: u64 = code.parse().map_err(|_| err("code is not a number"))?;
            SctId::new(code).map_err(|_| err("code fails the SNOMED CT check digit"))?;
            codes.insert(code);
        }
        if codes.is_empty() {
            return Err(CodeListError {
                line: 1,
                reason: "no codes",
            });
        }
        Ok(Self { version, codes })
    }

    /// The shipped list.
    pub fn shipped() -> Self {
        // The shipped file is checked by this crate's tests; an empty list would be a
        // build defect, so fall back to refusing nothing only if that test is bypassed.
        Self::parse(DEFAULT_CODE_LIST).unwrap_or(Self {
            version: String::from("invalid"),
            codes: BTreeSet::new(),
        })
    }

    /// The list's version line.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Whether the list holds `code`.
    pub fn contains(&self, code: u64) -> bool {
        self.codes.contains(&code)
    }

    /// How many items of `record` carry a listed code (alert codes, allergy substances
    /// and reaction manifestations, medicines). A device refuses a batch where this is
    /// not zero.
    pub fn listed_items(&self, record: &PatientRecord) -> usize {
        // SNOMED CT and dm+d codes share one namespace (dm+d ids are SCTIDs), so one
        // list covers both systems; other systems are mapped by the hub before this.
        let listed = |c: &Coding| c.sctid().is_some_and(|id| self.contains(id.as_u64()));
        let alerts = record
            .alerts
            .entries()
            .iter()
            .filter(|a| listed(&a.code))
            .count();
        let allergies = record
            .allergies
            .entries()
            .iter()
            .filter(|a| {
                listed(&a.substance)
                    || a.reactions
                        .iter()
                        .any(|r| r.manifestation.as_ref().is_some_and(listed))
            })
            .count();
        let medications = record
            .medications
            .entries()
            .iter()
            .filter(|m| listed(&m.medicine))
            .count();
        alerts + allergies + medications
    }
}

/// A data row of a versioned CSV file: its 1-based line number and its text.
pub type CsvRow<'a> = (usize, &'a str);

/// The rows of a versioned CSV data file (the code list, a hub's local-code map): `#`
/// comment lines, one of them `# version: …`, blank lines, a header line starting with
/// `header_prefix` (`header` names it in the error), then data rows, each with its 1-based
/// line number.
pub fn versioned_csv<'a>(
    text: &'a str,
    header_prefix: &str,
    header: &'static str,
) -> Result<(String, Vec<CsvRow<'a>>), CodeListError> {
    let mut version = None;
    let mut header_seen = false;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(comment) = line.strip_prefix('#') {
            if let Some(v) = comment.trim().strip_prefix("version:") {
                version = Some(v.trim().to_owned());
            }
            continue;
        }
        if line.is_empty() {
            continue;
        }
        if !header_seen {
            if !line.starts_with(header_prefix) {
                return Err(CodeListError {
                    line: i + 1,
                    reason: header,
                });
            }
            header_seen = true;
            continue;
        }
        rows.push((i + 1, line));
    }
    let version = version.ok_or(CodeListError {
        line: 1,
        reason: "no `# version:` line",
    })?;
    Ok((version, rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_list_loads_and_is_versioned() {
        let list = CodeList::parse(DEFAULT_CODE_LIST);
        assert!(
            list.as_ref()
                .is_ok_and(|l| !l.version().is_empty() && l.contains(86_406_008)),
            "{list:?}"
        );
    }

    #[test]
    fn bad_lists_name_the_line() {
        for (text, line) in [
            ("# version: 1\ncode,area\n123,x\n", 3),
            ("# version: 1\ncode,area\nabc,x\n", 3),
            ("code,area\n86406008,hiv\n", 1),
            ("# version: 1\n86406008,hiv\n", 2),
        ] {
            match CodeList::parse(text) {
                Err(CodeListError { line: l, .. }) => assert_eq!(l, line, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }
}
