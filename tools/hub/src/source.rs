//! Where the shared care record comes from: a directory of FHIR Bulk Data NDJSON files,
//! or a FHIR R4 server's REST API polled incrementally.

use std::collections::BTreeSet;
use std::io::BufRead;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::fhir_in::{Collector, MappingIssue, instant, map_patient, str_at};
use crate::sharing::SharingRules;
use crate::state::{HubState, IngestReport, StateError};

/// Longest NDJSON line or REST response accepted (a hostile or broken source cannot make
/// the hub allocate without bound).
const MAX_LINE: usize = 1024 * 1024;
const MAX_RESPONSE: u64 = 64 * 1024 * 1024;
/// Resource types read from a source.
pub const RESOURCE_TYPES: &[&str] = &[
    "Patient",
    "Flag",
    "AllergyIntolerance",
    "MedicationStatement",
    "RelatedPerson",
    "List",
    "Consent",
];

/// What one ingest did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct IngestSummary {
    /// Resources read.
    pub resources: u64,
    /// Patients mapped.
    pub patients: u64,
    /// Changes stored.
    pub stored: IngestReport,
    /// Resources that could not be read or mapped (type, id, rule; no patient data).
    pub issues: Vec<String>,
    /// Version of the sensitive code list applied.
    pub code_list_version: String,
}

/// A source failed as a whole (nothing was stored).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Files could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// File or directory.
        path: String,
        /// I/O error.
        source: std::io::Error,
    },
    /// The FHIR server failed or answered something unusable.
    #[error("FHIR server: {0}")]
    Fhir(String),
    /// Storing failed.
    #[error(transparent)]
    State(#[from] StateError),
}

fn map_and_store(
    state: &HubState,
    rules: &SharingRules,
    collector: Collector,
    full_snapshot: bool,
    resources: u64,
) -> Result<IngestSummary, SourceError> {
    let mut issues = collector.issues;
    let mut mapped = Vec::with_capacity(collector.patients.len());
    for (fhir_id, res) in collector.patients {
        match map_patient(&fhir_id, res, &mut issues) {
            Ok(m) => mapped.push((fhir_id, m)),
            Err(issue) => issues.push(issue),
        }
    }
    let patients = mapped.len() as u64;
    let stored = state.ingest(mapped, full_snapshot)?;
    let summary = IngestSummary {
        resources,
        patients,
        stored,
        issues: issues.iter().map(MappingIssue::to_string).collect(),
        code_list_version: rules.version().to_owned(),
    };
    for issue in &issues {
        tracing::warn!(%issue, "resource skipped");
    }
    tracing::info!(
        resources,
        patients,
        added = stored.added,
        changed = stored.changed,
        deleted = stored.deleted,
        objections = stored.objections,
        skipped = issues.len(),
        code_list = rules.version(),
        "ingest done"
    );
    let mut record = serde_json::to_value(&summary).unwrap_or(Value::Null);
    if let Some(list) = record.get_mut("issues").and_then(Value::as_array_mut) {
        list.truncate(100);
    }
    state.set_source_value("last_ingest", record.to_string().as_bytes())?;
    Ok(summary)
}

/// Read every `*.ndjson` file in `dir` as a full snapshot of the source: patients no
/// longer present are deleted upstream. A line that is not JSON is reported and skipped.
pub fn ingest_ndjson(
    state: &HubState,
    rules: &SharingRules,
    dir: &Path,
) -> Result<IngestSummary, SourceError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| SourceError::Io { path, source }
    };
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "ndjson"))
        .collect();
    files.sort();
    let mut collector = Collector::new(rules);
    let mut resources = 0u64;
    for path in files {
        let kind = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("")
            .to_owned();
        let reader = std::io::BufReader::new(std::fs::File::open(&path).map_err(io(&path))?);
        for (i, line) in reader.split(b'\n').enumerate() {
            let line = line.map_err(io(&path))?;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let issue = |reason| MappingIssue {
                resource_type: kind.clone(),
                id: format!("line {}", i + 1),
                reason,
            };
            if line.len() > MAX_LINE {
                collector.issues.push(issue("line over 1 MiB"));
                continue;
            }
            match serde_json::from_slice::<Value>(&line) {
                Ok(v) if v.is_object() => {
                    resources += 1;
                    collector.add(v);
                }
                _ => collector.issues.push(issue("not a JSON object")),
            }
        }
    }
    map_and_store(state, rules, collector, true, resources)
}

/// A FHIR R4 server polled by `_lastUpdated`.
#[derive(Debug)]
pub struct FhirRest {
    base: String,
    agent: ureq::Agent,
    overlap_ms: u64,
    page_size: u32,
}

impl FhirRest {
    /// A client for `base_url`.
    pub fn new(base_url: &str, overlap_secs: u64, page_size: u32) -> Self {
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(60)))
            .http_status_as_error(false)
            .build();
        Self {
            base: base_url.trim_end_matches('/').to_owned(),
            agent: config.into(),
            overlap_ms: overlap_secs.saturating_mul(1000),
            page_size: page_size.clamp(1, 5000),
        }
    }

    fn get(&self, url: &str) -> Result<Value, SourceError> {
        // Follow only links on the configured server: a hostile `next` cannot send the
        // hub elsewhere.
        if !url.starts_with(&self.base) {
            return Err(SourceError::Fhir(
                "a paging link leaves the configured server".into(),
            ));
        }
        let mut resp = self
            .agent
            .get(url)
            .header("Accept", "application/fhir+json")
            .call()
            .map_err(|e| SourceError::Fhir(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_RESPONSE)
            .read_to_vec()
            .map_err(|e| SourceError::Fhir(format!("reading response: {e}")))?;
        if status != 200 {
            return Err(SourceError::Fhir(format!("HTTP {status} for a search")));
        }
        serde_json::from_slice(&body).map_err(|_| SourceError::Fhir("response is not JSON".into()))
    }

    /// Every resource of a search, following `next` links.
    fn search(&self, query: &str) -> Result<Vec<Value>, SourceError> {
        let mut out = Vec::new();
        let mut url = format!("{}/{query}", self.base);
        for _ in 0..100_000 {
            let bundle = self.get(&url)?;
            if str_at(&bundle, &["resourceType"]) != Some("Bundle") {
                return Err(SourceError::Fhir("search did not return a Bundle".into()));
            }
            for e in bundle
                .get("entry")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(r) = e.get("resource") {
                    out.push(r.clone());
                }
            }
            let next = bundle
                .get("link")
                .and_then(Value::as_array)
                .and_then(|links| {
                    links
                        .iter()
                        .find(|l| str_at(l, &["relation"]) == Some("next"))
                })
                .and_then(|l| str_at(l, &["url"]));
            match next {
                Some(n) => url = n.to_owned(),
                None => return Ok(out),
            }
        }
        Err(SourceError::Fhir("search paging did not end".into()))
    }

    /// One incremental poll: resources changed since the last watermark (less the
    /// overlap), de-duplicated by id + versionId; each affected patient is then read
    /// whole by patient search and re-mapped.
    pub fn poll(
        &self,
        state: &HubState,
        rules: &SharingRules,
    ) -> Result<IngestSummary, SourceError> {
        let watermark = state
            .source_value("fhir.watermark")?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map_or(0, u64::from_be_bytes);
        let since = watermark.saturating_sub(self.overlap_ms);
        let since_text = sync_protocol::types::Timestamp::from_millis(since).map_or_else(
            |_| "1970-01-01T00:00:00Z".to_owned(),
            sync_protocol::types::Timestamp::rfc3339,
        );
        let mut affected = BTreeSet::new();
        let mut versions = Vec::new();
        let mut newest = watermark;
        for kind in RESOURCE_TYPES {
            let found = self.search(&format!(
                "{kind}?_lastUpdated=ge{since_text}&_count={}",
                self.page_size
            ))?;
            for r in found {
                let id = str_at(&r, &["id"]).unwrap_or("").to_owned();
                let version = str_at(&r, &["meta", "versionId"]).unwrap_or("").to_owned();
                if let Some(t) = str_at(&r, &["meta", "lastUpdated"]).and_then(|t| instant(t).ok())
                {
                    newest = newest.max(t.as_millis());
                }
                let key = format!("v:{kind}/{id}");
                if !version.is_empty()
                    && state.source_value(&key)?.as_deref() == Some(version.as_bytes())
                {
                    continue; // seen in an earlier, overlapping poll
                }
                let patient = if *kind == "Patient" {
                    Some(id.clone())
                } else {
                    str_at(&r, &["subject", "reference"])
                        .or_else(|| str_at(&r, &["patient", "reference"]))
                        .and_then(|p| p.strip_prefix("Patient/"))
                        .map(str::to_owned)
                };
                if let Some(p) = patient {
                    affected.insert(p);
                }
                versions.push((key, version));
            }
        }
        let mut collector = Collector::new(rules);
        let mut resources = 0u64;
        for pid in &affected {
            let patient = self.get(&format!("{}/Patient/{pid}", self.base))?;
            collector.add(patient);
            resources += 1;
            for kind in RESOURCE_TYPES.iter().skip(1) {
                for r in self.search(&format!("{kind}?patient=Patient/{pid}"))? {
                    // Only resources that really name this patient.
                    let names = str_at(&r, &["subject", "reference"])
                        .or_else(|| str_at(&r, &["patient", "reference"]))
                        == Some(format!("Patient/{pid}").as_str());
                    if names {
                        collector.add(r);
                        resources += 1;
                    }
                }
            }
        }
        let summary = map_and_store(state, rules, collector, false, resources)?;
        // One transaction for every seen version and the new watermark.
        let mut values: Vec<(String, Vec<u8>)> = versions
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes()))
            .collect();
        values.push(("fhir.watermark".to_owned(), newest.to_be_bytes().to_vec()));
        state.set_source_values(&values)?;
        Ok(summary)
    }
}
