//! Sharing rules applied at ingest, before anything is stored: sensitive items are
//! withheld by security label and by a versioned code-list data file. Objections are
//! applied when a device's view is built (`pull`), because they change independently of
//! the record.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;
use sync_protocol::sensitive::CodeList;

use crate::fhir_in::{security_codes, snomed_codes};

/// The code list shipped with carecache (shared with the device, which re-checks it).
pub const DEFAULT_CODE_LIST: &str = sync_protocol::sensitive::DEFAULT_CODE_LIST;

/// Sensitivity labels (v3 ActCode) withheld by default.
pub const DEFAULT_DENY_LABELS: &[&str] = &["SEX", "STD", "HIV", "SDV", "PREGNANT", "ETH", "PSY"];

const CONFIDENTIALITY: &str = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality";
const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";

/// A code list or label set that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SharingError {
    /// The code-list file is malformed (the operator's file is at fault).
    #[error("sensitive code list, line {line}: {reason}")]
    CodeList {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// The code-list file could not be read.
    #[error("reading the sensitive code list {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// What the hub withholds.
#[derive(Clone, Debug)]
pub struct SharingRules {
    list: CodeList,
    deny_labels: BTreeSet<String>,
}

impl SharingRules {
    /// Rules from a code list (CSV text, `# version: …` header) and sensitivity labels.
    pub fn new(code_list: &str, deny_labels: &[String]) -> Result<Self, SharingError> {
        let list = CodeList::parse(code_list).map_err(|e| SharingError::CodeList {
            line: e.line,
            reason: e.reason,
        })?;
        Ok(Self {
            list,
            deny_labels: deny_labels.iter().cloned().collect(),
        })
    }

    /// The shipped code list and default labels.
    pub fn default_rules() -> Result<Self, SharingError> {
        let labels: Vec<String> = DEFAULT_DENY_LABELS
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        Self::new(DEFAULT_CODE_LIST, &labels)
    }

    /// Rules from a code-list file.
    pub fn from_file(path: &Path, deny_labels: &[String]) -> Result<Self, SharingError> {
        let text = std::fs::read_to_string(path).map_err(|source| SharingError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::new(&text, deny_labels)
    }

    /// The code list's version (recorded with every ingest).
    pub fn version(&self) -> &str {
        self.list.version()
    }

    /// Whether the list holds `code`.
    pub fn lists(&self, code: u64) -> bool {
        self.list.contains(code)
    }

    /// True if an item must be withheld: confidentiality `R` or `V`, a denied
    /// sensitivity label, or any of its codes on the list.
    pub fn withholds(&self, item: &Value) -> bool {
        security_codes(item, CONFIDENTIALITY)
            .iter()
            .any(|c| matches!(*c, "R" | "V"))
            || security_codes(item, ACT_CODE)
                .iter()
                .any(|c| self.deny_labels.contains(*c))
            || snomed_codes(item).iter().any(|c| self.list.contains(*c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_list_loads_and_is_versioned() {
        let rules = SharingRules::default_rules().map_err(|e| e.to_string());
        assert!(
            rules.as_ref().is_ok_and(|r| !r.version().is_empty()),
            "{rules:?}"
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
            match SharingRules::new(text, &[]) {
                Err(SharingError::CodeList { line: l, .. }) => assert_eq!(l, line, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }
}
