//! Sharing rules applied at ingest, before anything is stored: sensitive items are
//! withheld by security label and by a versioned code-list data file, which covers SNOMED
//! CT and dm+d codes (dm+d ids are SCTIDs) and, through a region's versioned local-code
//! map, Read v2, CTV3 and local codes. Objections are applied when a device's view is
//! built (`pull`), because they change independently of the record.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use sync_protocol::sensitive::{CodeList, versioned_csv};
use sync_protocol::types::{DMD_SYSTEM, SNOMED_SYSTEM, SctId};

use carecache_fhir::model::Labels;

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
    /// The local-code map is malformed.
    #[error("local code map, line {line}: {reason}")]
    CodeMap {
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

/// What happens to a clinical item none of whose codes any list can check (only local
/// codes the map does not hold, or text alone).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Unclassified {
    /// Shown (the default): security labels still apply, and a locally coded DNACPR or
    /// safeguarding alert reaches the crew. Hazard log HAZ-14.
    #[default]
    Share,
    /// Withheld and counted, as a sensitive item is.
    Withhold,
}

/// A region's map from local, Read v2 or CTV3 codes to SNOMED CT (a ConceptMap as a CSV
/// file): `# version: …`, the header `system,code,snomed,display`, then one mapping a
/// line. Versioned and recorded with each ingest, like the code list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalCodeMap {
    version: String,
    map: BTreeMap<(String, String), Vec<u64>>,
}

impl LocalCodeMap {
    /// Parse the CSV text. Every target must pass the SNOMED CT check digit.
    pub fn parse(text: &str) -> Result<Self, SharingError> {
        let to_err = |e: sync_protocol::sensitive::CodeListError| SharingError::CodeMap {
            line: e.line,
            reason: e.reason,
        };
        let (version, rows) = versioned_csv(
            text,
            "system,code,snomed",
            "expected the header line `system,code,snomed,display`",
        )
        .map_err(to_err)?;
        let mut map: BTreeMap<(String, String), Vec<u64>> = BTreeMap::new();
        for (line, row) in rows {
            let err = |reason| SharingError::CodeMap { line, reason };
            let mut fields = row.splitn(4, ',');
            let system = fields.next().unwrap_or("").trim();
            let code = fields.next().unwrap_or("").trim();
            let target = fields.next().unwrap_or("").trim();
            if system.is_empty() || code.is_empty() {
                return Err(err("system and code are required"));
            }
            let target: u64 = target.parse().map_err(|_| err("snomed is not a number"))?;
            SctId::new(target).map_err(|_| err("snomed fails the SNOMED CT check digit"))?;
            map.entry((system.to_owned(), code.to_owned()))
                .or_default()
                .push(target);
        }
        Ok(Self { version, map })
    }

    /// The map's version line.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The SNOMED CT concepts a (system, code) maps to.
    pub fn targets(&self, system: &str, code: &str) -> &[u64] {
        self.map
            .get(&(system.to_owned(), code.to_owned()))
            .map_or(&[], Vec::as_slice)
    }
}

/// What the hub withholds.
#[derive(Clone, Debug)]
pub struct SharingRules {
    list: CodeList,
    deny_labels: BTreeSet<String>,
    local_map: Option<LocalCodeMap>,
    unclassified: Unclassified,
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
            local_map: None,
            unclassified: Unclassified::Share,
        })
    }

    /// The same rules with a region's local-code map.
    pub fn with_local_map(mut self, map: LocalCodeMap) -> Self {
        self.local_map = Some(map);
        self
    }

    /// The same rules with a policy for items no list can classify.
    pub fn with_unclassified(mut self, policy: Unclassified) -> Self {
        self.unclassified = policy;
        self
    }

    /// The local-code map's version, if one is loaded (recorded with every ingest).
    pub fn local_map_version(&self) -> Option<&str> {
        self.local_map.as_ref().map(LocalCodeMap::version)
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
    /// sensitivity label (on any item), any of its SNOMED CT or dm+d codes on the list,
    /// any of its other codes mapped to a listed concept — or, for a clinical item none of
    /// whose codes a list could check, the [`Unclassified`] policy says so.
    pub fn withholds(&self, item: &Labels) -> bool {
        if item
            .security(CONFIDENTIALITY)
            .iter()
            .any(|c| matches!(*c, "R" | "V"))
            || item
                .security(ACT_CODE)
                .iter()
                .any(|c| self.deny_labels.contains(*c))
        {
            return true;
        }
        let mut classified = false;
        for (system, code) in item.codings() {
            let listed = match system {
                SNOMED_SYSTEM | DMD_SYSTEM => match code.parse::<u64>() {
                    Ok(c) => {
                        classified = true;
                        self.list.contains(c)
                    }
                    Err(_) => false,
                },
                // A coding with no system cannot be classified, but a listed SCTID in it
                // is withheld all the same (privacy fails closed).
                "" => code.parse::<u64>().is_ok_and(|c| self.list.contains(c)),
                _ => {
                    let targets = self
                        .local_map
                        .as_ref()
                        .map_or(&[][..], |m| m.targets(system, code));
                    classified |= !targets.is_empty();
                    targets.iter().any(|c| self.list.contains(*c))
                }
            };
            if listed {
                return true;
            }
        }
        let clinical = matches!(
            item.kind(),
            "Flag" | "AllergyIntolerance" | "MedicationStatement"
        );
        clinical && !classified && self.unclassified == Unclassified::Withhold
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    fn withholds(rules: &SharingRules, item: &serde_json::Value) -> bool {
        rules.withholds(&Labels::deserialize(item).unwrap())
    }

    #[test]
    fn shipped_list_loads_and_is_versioned() {
        let rules = SharingRules::default_rules().map_err(|e| e.to_string());
        assert!(
            rules.as_ref().is_ok_and(|r| !r.version().is_empty()),
            "{rules:?}"
        );
    }

    /// HAZ-14: every coding system with a list is checked (SNOMED CT, dm+d, and local
    /// codes through the map); an item no list can classify follows the policy, and by
    /// default a locally coded DNACPR alert is shared; labels apply to any item.
    #[test]
    fn every_listed_coding_system_is_checked_and_unclassified_items_follow_the_policy() {
        use serde_json::json;
        const LOCAL: &str = "https://gp.invalid/cs";
        let map = LocalCodeMap::parse(&format!(
            "# version: t-1\nsystem,code,snomed,display\n{LOCAL},HIV1,86406008,HIV\n{LOCAL},DNR,450476008,DNACPR\n"
        ))
        .unwrap();
        let rules = SharingRules::default_rules().unwrap().with_local_map(map);
        let item = |system: &str, code: &str| json!({ "resourceType": "Flag", "code": { "coding": [{ "system": system, "code": code, "display": "x" }] } });
        assert!(withholds(&rules, &item(SNOMED_SYSTEM, "86406008")));
        assert!(withholds(&rules, &item(DMD_SYSTEM, "86406008")));
        assert!(withholds(&rules, &item(LOCAL, "HIV1")));
        let systemless =
            json!({ "resourceType": "Flag", "code": { "coding": [{ "code": "86406008" }] } });
        assert!(
            withholds(&rules, &systemless),
            "a listed code with no system"
        );
        assert!(!withholds(&rules, &item(LOCAL, "DNR")));
        let unmapped = item(LOCAL, "DNACPR-LOCAL");
        let text_only = json!({ "resourceType": "AllergyIntolerance", "code": { "text": "penicillin - rash" } });
        assert!(!withholds(&rules, &unmapped), "shared by default");
        assert!(!withholds(&rules, &text_only));
        let strict = rules.clone().with_unclassified(Unclassified::Withhold);
        assert!(withholds(&strict, &unmapped));
        assert!(withholds(&strict, &text_only));
        assert!(
            !withholds(&strict, &item(LOCAL, "DNR")),
            "mapped: classified"
        );
        let labelled = json!({ "resourceType": "RelatedPerson", "meta": { "security": [{ "system": ACT_CODE, "code": "HIV" }] } });
        assert!(withholds(&rules, &labelled));
        assert_eq!(rules.local_map_version(), Some("t-1"));
    }

    #[test]
    fn bad_local_maps_name_the_line() {
        for (text, line) in [
            ("system,code,snomed\nA,B,86406008\n", 1),
            ("# version: 1\nsystem,code\n", 2),
            ("# version: 1\nsystem,code,snomed\nA,B,86406009\n", 3),
            ("# version: 1\nsystem,code,snomed\n,B,86406008\n", 3),
            ("# version: 1\nsystem,code,snomed\nA,B,x\n", 3),
        ] {
            match LocalCodeMap::parse(text) {
                Err(SharingError::CodeMap { line: l, .. }) => assert_eq!(l, line, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
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
