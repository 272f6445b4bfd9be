//! Where the shared care record comes from: a directory of FHIR Bulk Data NDJSON files,
//! or a FHIR R4 server's REST API polled incrementally.

use std::collections::BTreeSet;

use redb::{ReadableDatabase, ReadableTable};
use std::io::BufRead;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use carecache_fhir::dates::instant;
use carecache_fhir::model::{Bundle, BundleEntry, Envelope};
use serde::Deserialize;

use crate::fhir_in::{
    Collector, Mapped, MappingIssue, Route, map_patient, patient_of, route, unsent_patient,
};
use crate::sharing::SharingRules;
use crate::state::{HubState, INGEST_BATCH, IngestReport, StateError};

/// Longest NDJSON line or REST response accepted (a hostile or broken source cannot make
/// the hub allocate without bound).
const MAX_LINE: usize = 1024 * 1024;
const MAX_RESPONSE: u64 = 64 * 1024 * 1024;
/// Patients read whole by one search per resource type.
const PATIENTS_PER_SEARCH: usize = 50;
/// [`PATIENTS_PER_SEARCH`] as a `_count`.
const PATIENTS_PER_SEARCH_COUNT: u32 = 50;
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
    /// Resources that could not be read or mapped (type, id, rule; no patient data): the
    /// first [`ISSUES_KEPT`].
    pub issues: Vec<String>,
    /// How many resources could not be read or mapped in all.
    pub issues_total: u64,
    /// Version of the sensitive code list applied.
    pub code_list_version: String,
    /// Version of the local-code map applied, if any.
    pub local_code_map_version: Option<String>,
    /// REST source: whether the server's `_history` could be read for deletions.
    pub history: Option<bool>,
    /// REST source: whether this poll read every known patient again.
    pub reconciled: Option<bool>,
}

/// Issues kept (listed and logged one by one) per ingest; the rest are counted.
pub const ISSUES_KEPT: usize = 1000;

/// A source failed as a whole. Batches stored before the failure stay stored (each is
/// whole patients); the next ingest completes the rest.
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
    /// The ingest's staging file failed (disk full, say).
    #[error("ingest staging file: {0}")]
    Staging(String),
    /// Storing failed.
    #[error(transparent)]
    State(#[from] StateError),
}

/// Patients mapped and stored in batches of [`INGEST_BATCH`]: what an ingest holds in
/// memory is one batch, whatever the size of the source.
struct Sink<'a> {
    state: &'a HubState,
    rules: &'a SharingRules,
    batch: Vec<(String, Mapped)>,
    summary: IngestSummary,
}

impl<'a> Sink<'a> {
    fn new(state: &'a HubState, rules: &'a SharingRules) -> Self {
        Self {
            state,
            rules,
            batch: Vec::with_capacity(INGEST_BATCH),
            summary: IngestSummary::default(),
        }
    }

    fn issue(&mut self, issue: &MappingIssue) {
        if self.summary.issues.len() < ISSUES_KEPT {
            tracing::warn!(%issue, "resource skipped");
            self.summary.issues.push(issue.to_string());
        }
        self.summary.issues_total += 1;
    }

    /// Map the patients `collector` holds; full batches are stored. Returns the NHS
    /// numbers of the patients mapped.
    fn add(&mut self, collector: Collector) -> Result<Vec<u64>, SourceError> {
        let (patients, issues) = collector.finish();
        let mut issues_now = issues;
        let mut mapped_nhs = Vec::with_capacity(patients.len());
        for (fhir_id, res) in patients {
            match map_patient(&fhir_id, res, &mut issues_now) {
                Ok(m) => {
                    mapped_nhs.push(m.record.nhs_number.as_u64());
                    self.batch.push((fhir_id, m));
                }
                Err(issue) => issues_now.push(issue),
            }
        }
        for issue in &issues_now {
            self.issue(issue);
        }
        self.summary.patients += mapped_nhs.len() as u64;
        if self.batch.len() >= INGEST_BATCH {
            self.flush()?;
        }
        Ok(mapped_nhs)
    }

    fn flush(&mut self) -> Result<(), SourceError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(INGEST_BATCH));
        let n = batch.len();
        self.summary.stored += self.state.ingest_batch(batch)?;
        tracing::debug!(
            patients = n,
            head = self.state.head()?,
            "ingest batch stored"
        );
        Ok(())
    }

    /// Store what is left; record and log the summary.
    fn finish(mut self, resources: u64) -> Result<IngestSummary, SourceError> {
        self.flush()?;
        let mut summary = self.summary;
        summary.resources = resources;
        summary.code_list_version = self.rules.version().to_owned();
        summary.local_code_map_version = self.rules.local_map_version().map(str::to_owned);
        Ok(summary)
    }
}

/// Log an ingest's summary and keep it (with its first 100 issues) for the admin API.
fn record_summary(state: &HubState, summary: &IngestSummary) -> Result<(), SourceError> {
    let stored = &summary.stored;
    tracing::info!(
        resources = summary.resources,
        patients = summary.patients,
        added = stored.added,
        changed = stored.changed,
        unchanged = stored.unchanged,
        deleted = stored.deleted,
        objections = stored.objections,
        skipped = summary.issues_total,
        code_list = summary.code_list_version,
        "ingest done"
    );
    let mut record = serde_json::to_value(summary).unwrap_or(Value::Null);
    if let Some(list) = record.get_mut("issues").and_then(Value::as_array_mut) {
        list.truncate(100);
    }
    // When it finished, by the wall clock (for the ingest's age in /metrics).
    if let Some(o) = record.as_object_mut() {
        o.insert(
            "finished_at_ms".into(),
            crate::server::system_clock().as_millis().into(),
        );
    }
    state.set_source_value("last_ingest", record.to_string().as_bytes())?;
    Ok(())
}

/// The staging file of an NDJSON ingest: every resource line, keyed by the patient it
/// belongs to, so that the export (one file per resource type, any order) can be read
/// back one patient at a time. A redb file beside the hub's database (the same
/// protection), with a small cache and no fsync, removed when the ingest ends.
struct Staging {
    db: redb::Database,
    _file: tempfile::NamedTempFile,
}

/// (patient FHIR id, line number) → the resource's JSON.
const BY_PATIENT: redb::TableDefinition<(&str, u64), &[u8]> =
    redb::TableDefinition::new("by_patient");
/// (NHS number, line number) → JSON of a resource naming its patient by NHS number.
const BY_NHS: redb::TableDefinition<(u64, u64), &[u8]> = redb::TableDefinition::new("by_nhs");
/// NHS numbers mapped by this ingest (a full snapshot deletes the others).
const SEEN: redb::TableDefinition<u64, ()> = redb::TableDefinition::new("seen");
/// Staged bytes per staging transaction.
const STAGE_BYTES: usize = 16 * 1024 * 1024;

/// Name prefix of staging files.
const STAGING_PREFIX: &str = ".ingest-";

impl Staging {
    /// A new staging file in `dir`, after removing any an interrupted ingest left there
    /// (one ingest runs at a time: the caller holds the state's ingest lock).
    fn create(dir: &Path) -> Result<Self, SourceError> {
        let err = |e: &dyn std::fmt::Display| SourceError::Staging(e.to_string());
        for entry in std::fs::read_dir(dir).map_err(|e| err(&e))?.flatten() {
            if entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(STAGING_PREFIX) && n.ends_with(".redb"))
            {
                std::fs::remove_file(entry.path()).map_err(|e| err(&e))?;
            }
        }
        let file = tempfile::Builder::new()
            .prefix(STAGING_PREFIX)
            .suffix(".redb")
            .tempfile_in(dir)
            .map_err(|e| err(&e))?;
        let db = redb::Database::builder()
            .set_cache_size(16 * 1024 * 1024)
            .create(file.path())
            .map_err(|e| err(&e))?;
        Ok(Self { db, _file: file })
    }

    fn write(&self) -> Result<redb::WriteTransaction, SourceError> {
        let mut tx = self.db.begin_write().map_err(staging)?;
        tx.set_durability(redb::Durability::None).map_err(staging)?;
        Ok(tx)
    }
}

/// Where a staged line goes.
enum Stage {
    Patient(String),
    Nhs(u64),
}

impl Staging {
    /// Record the NHS numbers in `seen` (emptied) as mapped by this ingest.
    fn mark_seen(&self, seen: &mut Vec<u64>) -> Result<(), SourceError> {
        let tx = self.write()?;
        {
            let mut table = tx.open_table(SEEN).map_err(staging)?;
            for nhs in seen.drain(..) {
                table.insert(nhs, ()).map_err(staging)?;
            }
        }
        tx.commit().map_err(staging)
    }

    /// Stage `buffer` (emptied) in one transaction, numbering lines from `line_no`.
    fn put(
        &self,
        buffer: &mut Vec<(Stage, Vec<u8>)>,
        line_no: &mut u64,
    ) -> Result<(), SourceError> {
        let tx = self.write()?;
        {
            let mut by_patient = tx.open_table(BY_PATIENT).map_err(staging)?;
            let mut by_nhs = tx.open_table(BY_NHS).map_err(staging)?;
            for (stage, line) in buffer.drain(..) {
                *line_no += 1;
                match stage {
                    Stage::Patient(pid) => {
                        by_patient.insert((pid.as_str(), *line_no), line.as_slice())
                    }
                    Stage::Nhs(nhs) => by_nhs.insert((nhs, *line_no), line.as_slice()),
                }
                .map_err(staging)?;
            }
        }
        tx.commit().map_err(staging)
    }
}

fn staging(e: impl std::fmt::Display) -> SourceError {
    SourceError::Staging(e.to_string())
}

/// Read every `*.ndjson` file in `dir` as a full snapshot of the source: patients no
/// longer present are deleted upstream. A line that is not JSON is reported and skipped.
///
/// Streaming, in three passes with memory bounded by one batch: the lines are staged by
/// patient (only each resource's envelope is read); then each patient's resources are
/// read back, mapped and stored in batches of [`INGEST_BATCH`]; then, the snapshot being
/// whole, held patients it lacks are deleted.
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
    let _one = state.ingest_lock()?;
    let started = std::time::Instant::now();
    let staged = Staging::create(&state.dir)?;
    let mut sink = Sink::new(state, rules);
    let mut resources = 0u64;
    let mut line_no = 0u64;
    // Pass 1: stage every line under its patient, 16 MiB at a time.
    let mut buffer: Vec<(Stage, Vec<u8>)> = Vec::new();
    let mut pending = 0usize;
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
                sink.issue(&issue("line over 1 MiB"));
                continue;
            }
            // Only the envelope is read now (the whole line is checked to be JSON).
            let env = match serde_json::from_slice::<Envelope>(&line) {
                Ok(env) if line.trim_ascii_start().first() == Some(&b'{') => env,
                _ => {
                    sink.issue(&issue("not a JSON object"));
                    continue;
                }
            };
            resources += 1;
            match route(&env) {
                Route::Patient(pid) | Route::Item(pid) => {
                    pending += line.len();
                    buffer.push((Stage::Patient(pid), line));
                }
                Route::ByNhs(nhs) => {
                    pending += line.len();
                    buffer.push((Stage::Nhs(nhs), line));
                }
                Route::Unplaced(reason) => sink.issue(&MappingIssue {
                    resource_type: env.kind().to_owned(),
                    id: env.id().to_owned(),
                    reason,
                }),
            }
            if pending >= STAGE_BYTES {
                staged.put(&mut buffer, &mut line_no)?;
                pending = 0;
            }
        }
    }
    staged.put(&mut buffer, &mut line_no)?;
    let staged_at = std::time::Instant::now();
    tracing::debug!(
        ms = staged_at.duration_since(started).as_millis(),
        resources,
        "source staged"
    );
    // Pass 2: one patient at a time, in batches.
    let mut placed = std::collections::HashSet::new();
    {
        let read = staged.db.begin_read().map_err(staging)?;
        let by_patient = match read.open_table(BY_PATIENT) {
            Ok(t) => Some(t),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(staging(e)),
        };
        let by_nhs = match read.open_table(BY_NHS) {
            Ok(t) => Some(t),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(staging(e)),
        };
        let mut current: Option<(String, Collector)> = None;
        // NHS numbers mapped, written to the staging file a batch at a time.
        let mut seen: Vec<u64> = Vec::with_capacity(INGEST_BATCH);
        let mut finish_patient = |pid: String,
                                  mut collector: Collector,
                                  seen: &mut Vec<u64>|
         -> Result<(), SourceError> {
            if let (Some(nhs), Some(by_nhs)) = (collector.nhs_of(&pid), by_nhs.as_ref())
                && placed.insert(nhs)
            {
                for item in by_nhs.range((nhs, 0)..=(nhs, u64::MAX)).map_err(staging)? {
                    let (_, v) = item.map_err(staging)?;
                    if let Ok(v) = serde_json::from_slice::<Value>(v.value()) {
                        collector.add(v);
                    }
                }
            }
            seen.extend(sink.add(collector)?);
            if seen.len() >= INGEST_BATCH {
                staged.mark_seen(seen)?;
            }
            Ok(())
        };
        if let Some(by_patient) = &by_patient {
            for item in by_patient.iter().map_err(staging)? {
                let (k, v) = item.map_err(staging)?;
                let pid = k.value().0;
                if current.as_ref().is_none_or(|(p, _)| p != pid) {
                    if let Some((p, c)) = current.take() {
                        finish_patient(p, c, &mut seen)?;
                    }
                    current = Some((pid.to_owned(), Collector::new(rules)));
                }
                if let (Some((_, c)), Ok(v)) =
                    (current.as_mut(), serde_json::from_slice::<Value>(v.value()))
                {
                    c.add(v);
                }
            }
        }
        if let Some((p, c)) = current.take() {
            finish_patient(p, c, &mut seen)?;
        }
        staged.mark_seen(&mut seen)?;
        // Pass 3: items naming, by NHS number, a Patient the source did not send.
        if let Some(by_nhs) = &by_nhs {
            for item in by_nhs.iter().map_err(staging)? {
                let (k, v) = item.map_err(staging)?;
                if placed.contains(&k.value().0) {
                    continue;
                }
                let env = serde_json::from_slice::<Envelope>(v.value()).unwrap_or_default();
                sink.issue(&unsent_patient(env.kind().to_owned(), env.id().to_owned()));
            }
        }
    }
    let mut summary = sink.finish(resources)?;
    tracing::debug!(
        ms = staged_at.elapsed().as_millis(),
        "patients mapped and stored"
    );
    // The snapshot is whole: held patients it did not map are deleted upstream.
    let read = staged.db.begin_read().map_err(staging)?;
    let seen = match read.open_table(SEEN) {
        Ok(t) => Some(t),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(staging(e)),
    };
    summary.stored.deleted += state.delete_absent(|nhs| match &seen {
        Some(t) => t
            .get(nhs)
            .map(|v| v.is_some())
            .map_err(|e| StateError::Database(format!("ingest staging file: {e}"))),
        None => Ok(false),
    })?;
    record_summary(state, &summary)?;
    Ok(summary)
}

/// A FHIR R4 server polled by `_lastUpdated`, with deletions found through `_history`
/// where the server offers it and by a periodic reconciliation where it does not.
#[derive(Debug)]
pub struct FhirRest {
    base: String,
    agent: ureq::Agent,
    overlap_ms: u64,
    page_size: u32,
    reconcile_ms: u64,
}

/// What a GET found.
enum Got {
    Found(Value),
    /// 404 or 410: the resource is not (or no longer) there.
    Gone,
    /// Another 4xx: the server does not offer this interaction.
    Refused(u16),
}

impl FhirRest {
    /// A client for `base_url`; reconciliation every hour.
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
            reconcile_ms: 3_600_000,
        }
    }

    /// Read every known patient again whole at least every `secs` seconds (0: every
    /// poll): a resource deleted at the source without a trace in `_history` leaves
    /// devices within one interval.
    pub fn with_reconcile(mut self, secs: u64) -> Self {
        self.reconcile_ms = secs.saturating_mul(1000);
        self
    }

    fn fetch(&self, url: &str) -> Result<Got, SourceError> {
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
        match status {
            200 => serde_json::from_slice(&body)
                .map(Got::Found)
                .map_err(|_| SourceError::Fhir("response is not JSON".into())),
            404 | 410 => Ok(Got::Gone),
            400..=499 => Ok(Got::Refused(status)),
            _ => Err(SourceError::Fhir(format!("HTTP {status} for a search"))),
        }
    }

    /// Every entry of a search or history, following `next` links; `None` if the server
    /// refuses the first page (it does not offer the interaction).
    fn entries(&self, query: &str) -> Result<Option<Vec<BundleEntry<Value>>>, SourceError> {
        let mut out = Vec::new();
        let mut url = format!("{}/{query}", self.base);
        let mut total = None;
        for page in 0..100_000 {
            let bundle = match self.fetch(&url)? {
                Got::Found(b) => b,
                Got::Refused(_) | Got::Gone if page == 0 => return Ok(None),
                Got::Refused(s) => return Err(SourceError::Fhir(format!("HTTP {s} paging"))),
                Got::Gone => return Err(SourceError::Fhir("HTTP 404 paging".into())),
            };
            let is_bundle = Envelope::deserialize(&bundle).is_ok_and(|e| e.kind() == "Bundle");
            let bundle = Bundle::<Value>::deserialize(&bundle)
                .ok()
                .filter(|_| is_bundle)
                .ok_or_else(|| SourceError::Fhir("search did not return a Bundle".into()))?;
            if page == 0 {
                total = bundle.total;
            }
            let next = bundle.next().map(str::to_owned);
            out.extend(bundle.entry);
            match next {
                Some(n) => url = n,
                None => {
                    // A server that says it matched more than it sent, and offers no
                    // next page, would make a shorter record look complete: fail the
                    // poll instead (nothing is stored).
                    let matched = out.iter().filter(|e| is_match(e)).count() as u64;
                    if total.is_some_and(|t| t > matched) {
                        return Err(SourceError::Fhir(format!(
                            "the server matched {} but sent {matched} with no next page",
                            total.unwrap_or(0)
                        )));
                    }
                    return Ok(Some(out));
                }
            }
        }
        Err(SourceError::Fhir("search paging did not end".into()))
    }

    /// Every resource of a search, following `next` links.
    fn search(&self, query: &str) -> Result<Vec<Value>, SourceError> {
        let entries = self
            .entries(query)?
            .ok_or_else(|| SourceError::Fhir("the server refused a search".into()))?;
        Ok(entries
            .into_iter()
            .filter(is_match)
            .filter_map(|e| e.resource)
            .collect())
    }

    /// One incremental poll: resources changed since the last watermark (less the
    /// overlap), de-duplicated by id + versionId; resources deleted since then, from the
    /// server's `_history`; and, when the reconciliation interval has passed, every
    /// patient the hub holds. Each affected patient is then read whole (Patient by id,
    /// its resources by patient search) and re-mapped, so an item deleted at the source
    /// leaves the record; a Patient that is gone (404/410) is deleted with its record.
    pub fn poll(
        &self,
        state: &HubState,
        rules: &SharingRules,
    ) -> Result<IngestSummary, SourceError> {
        let _one = state.ingest_lock()?;
        let watermark = state
            .source_value("fhir.watermark")?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map_or(0, u64::from_be_bytes);
        let since = watermark.saturating_sub(self.overlap_ms);
        let since_text = sync_protocol::types::Timestamp::from_millis(since).map_or_else(
            |_| "1970-01-01T00:00:00Z".to_owned(),
            sync_protocol::types::Timestamp::rfc3339,
        );
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut affected = BTreeSet::new();
        let mut values: Vec<(String, Vec<u8>)> = Vec::new();
        let mut newest = watermark;
        for kind in RESOURCE_TYPES {
            let found = self.search(&format!(
                "{kind}?_lastUpdated=ge{since_text}&_count={}",
                self.page_size
            ))?;
            for r in found {
                let env = Envelope::deserialize(&r).unwrap_or_default();
                let id = env.id().to_owned();
                let meta = env.meta();
                let version = meta.and_then(|m| m.version_id.clone()).unwrap_or_default();
                if let Some(t) = meta
                    .and_then(|m| m.last_updated.as_deref())
                    .and_then(|t| instant(t).ok())
                {
                    newest = newest.max(t.as_millis());
                }
                let key = format!("v:{kind}/{id}");
                if !version.is_empty()
                    && state.source_value(&key)?.as_deref() == Some(version.as_bytes())
                {
                    continue; // seen in an earlier, overlapping poll
                }
                if let Some(p) = patient_of(&r) {
                    affected.insert(p);
                }
                values.push((key, version.into_bytes()));
            }
        }
        // Deletions the server keeps in its history: the patient the resource belonged
        // to is known from when it was read (`p:` keys).
        let mut history = true;
        for kind in RESOURCE_TYPES {
            let Some(entries) = self.entries(&format!(
                "{kind}/_history?_since={since_text}&_count={}",
                self.page_size
            ))?
            else {
                history = false;
                continue;
            };
            for e in entries {
                let request = e.request.as_ref();
                let deleted = request.and_then(|r| r.method.as_deref()) == Some("DELETE")
                    || (e.resource.is_none()
                        && e.response
                            .as_ref()
                            .and_then(|r| r.status.as_deref())
                            .is_some_and(|s| s.starts_with("204") || s.starts_with("410")));
                if !deleted {
                    continue;
                }
                let Some(id) = request
                    .and_then(|r| r.url.as_deref())
                    .or(e.full_url.as_deref())
                    .and_then(|u| deleted_id(u, kind))
                else {
                    continue;
                };
                if *kind == "Patient" {
                    affected.insert(id);
                } else if let Some(p) = state.source_value(&format!("p:{kind}/{id}"))? {
                    affected.insert(String::from_utf8_lossy(&p).into_owned());
                }
            }
        }
        let last_reconcile = state
            .source_value("fhir.reconciled")?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map_or(0, u64::from_be_bytes);
        let reconcile = now_ms.saturating_sub(last_reconcile) >= self.reconcile_ms;
        if reconcile {
            affected.extend(state.patient_fhir_ids()?);
            values.push(("fhir.reconciled".to_owned(), now_ms.to_be_bytes().to_vec()));
        }
        // Affected patients are read whole, in groups (one search per resource type for a
        // group: `patient=Patient/a,Patient/b,…`), which costs a server one pass per type
        // and group rather than per patient; each group is mapped as soon as it is read,
        // and stored in batches.
        let mut sink = Sink::new(state, rules);
        let mut resources = 0u64;
        let mut gone = Vec::new();
        let affected: Vec<String> = affected.into_iter().collect();
        for group in affected.chunks(PATIENTS_PER_SEARCH) {
            let mut collector = Collector::new(rules);
            let mut links: Vec<(String, Vec<u8>)> = Vec::new();
            let ids = group.join(",");
            let found = self.search(&format!(
                "Patient?_id={ids}&_count={}",
                self.page_size.max(PATIENTS_PER_SEARCH_COUNT)
            ))?;
            let mut present = BTreeSet::new();
            for patient in found {
                let env = Envelope::deserialize(&patient).unwrap_or_default();
                match Some(env.id()).filter(|id| env.kind() == "Patient" && !id.is_empty()) {
                    Some(id) if group.iter().any(|g| g == id) => {
                        present.insert(id.to_owned());
                        collector.add(patient);
                        resources += 1;
                    }
                    _ => {}
                }
            }
            // A Patient the server no longer returns is deleted (404/410 confirms it; any
            // other answer fails the poll: groups stored so far stay, the watermark does
            // not move, and the next poll reads them again).
            for pid in group.iter().filter(|p| !present.contains(*p)) {
                match self.fetch(&format!("{}/Patient/{pid}", self.base))? {
                    Got::Gone => gone.push(pid.clone()),
                    Got::Found(_) | Got::Refused(_) => {
                        return Err(SourceError::Fhir(
                            "a Patient missing from a search is still readable".into(),
                        ));
                    }
                }
            }
            let refs: Vec<String> = present.iter().map(|p| format!("Patient/{p}")).collect();
            if refs.is_empty() {
                continue;
            }
            for kind in RESOURCE_TYPES.iter().skip(1) {
                for r in self.search(&format!(
                    "{kind}?patient={}&_count={}",
                    refs.join(","),
                    self.page_size
                ))? {
                    // Only resources that really name one of these patients.
                    let Some(pid) = patient_of(&r).filter(|p| present.contains(p)) else {
                        continue;
                    };
                    let env = Envelope::deserialize(&r).unwrap_or_default();
                    if !env.id().is_empty() {
                        links.push((format!("p:{kind}/{}", env.id()), pid.as_bytes().to_vec()));
                    }
                    collector.add(r);
                    resources += 1;
                }
            }
            sink.add(collector)?;
            state.set_source_values(&links)?;
        }
        let mut summary = sink.finish(resources)?;
        summary.stored.deleted += state.delete_patients(&gone)?;
        summary.history = Some(history);
        summary.reconciled = Some(reconcile);
        record_summary(state, &summary)?;
        // One transaction for every seen version and the new watermark, after every
        // affected patient is stored.
        values.push(("fhir.watermark".to_owned(), newest.to_be_bytes().to_vec()));
        state.set_source_values(&values)?;
        Ok(summary)
    }
}

/// True for a search entry that is a match (not an OperationOutcome note).
fn is_match(e: &BundleEntry<Value>) -> bool {
    matches!(
        e.search.as_ref().and_then(|s| s.mode.as_deref()),
        None | Some("match")
    )
}

/// The id in a history entry's `request.url` or `fullUrl` (`Flag/7`, `…/Flag/7`,
/// `Flag/7/_history/3`) for a resource of `kind`.
fn deleted_id(url: &str, kind: &str) -> Option<String> {
    let marker = format!("{kind}/");
    let at = url.rfind(&marker)?;
    let rest = url.get(at + marker.len()..)?;
    let id = rest.split(['/', '?']).next()?;
    (!id.is_empty() && id != "_history").then(|| id.to_owned())
}
