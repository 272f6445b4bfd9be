//! The synthetic record as the upstream shared care record would export it: FHIR R4
//! resources shaped after UK Core, written as Bulk Data NDJSON (one file per resource
//! type, one resource per line).
//!
//! The clinical resources are written by the one FHIR mapping the device also uses
//! (`carecache_fhir::write`); this module adds what a source system's export carries
//! besides: `meta.versionId`, the `HTEST` label (synthetic), sensitivity labels on the
//! items the hub must withhold, the "allergies unavailable" List, unreadable items and
//! Consents. Conventions the hub's mapping relies on (documented in
//! `tools/hub/README.md`):
//! - item provenance: `meta.source` = `https://fhir.nhs.uk/Id/ods-organization-code|ODS`,
//!   `meta.lastUpdated` = when it last changed; every resource carries `meta.versionId`;
//! - Flag: `category[0]` has the flag-category coding and the alert category as text;
//!   severity in the core `flag-priority` extension (PL, PM, PH); detail in `code.text`;
//! - an allergy section the source cannot provide is a `List` (code 886921000000105) with
//!   `emptyReason` `unavailable`; no resources of a kind means "none recorded";
//! - an objection is a `Consent` (scope patient-privacy, provision deny, purpose TREAT),
//!   `active` while it stands and `inactive` once withdrawn;
//! - every resource is labelled `HTEST` (synthetic) in `meta.security`.
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use carecache_fhir::codes::{self, ACT_CODE, ACT_REASON, CONFIDENTIALITY, SNOMED};
use carecache_fhir::model::{
    self, Annotation, CodeableConcept, Coding, Consent, Meta, Provision as FhirProvision,
    Reference, Resource,
};
use carecache_fhir::write;
use serde_json::Value;
use sync_protocol::record::{Allergy, Section};
use sync_protocol::types::Timestamp;

use crate::dataset::{
    ConsentDate, ConsentStatus, LOCAL_ALERT_SYSTEM, LaterWithdrawal, Objection, Provision,
    SourcePatient, Unreadable as UnreadableItem, Withheld,
};

/// NHS number identifier system.
pub const NHS_NUMBER_SYSTEM: &str = codes::NHS_NUMBER_SYSTEM;
/// ODS organisation code identifier system.
pub const ODS_SYSTEM: &str = codes::ODS_SYSTEM;

/// Every resource of one patient, as JSON.
pub fn resources(p: &SourcePatient) -> Vec<Value> {
    typed_resources(p).iter().map(Resource::to_json).collect()
}

/// Every resource of one patient, grouped by resource type.
pub fn typed_resources(p: &SourcePatient) -> Vec<Resource> {
    let pid = p.fhir_id.as_str();
    let r = &p.expected;
    let mut out = vec![patient(p)];
    out.extend(r.alerts.entries().iter().map(|a| flag(pid, a, None)));
    out.extend(r.allergies.entries().iter().map(|a| allergy(pid, a, false)));
    if matches!(r.allergies, Section::NotAvailable) {
        out.push(unavailable_allergies(pid, p.last_updated));
    }
    out.extend(
        r.medications
            .entries()
            .iter()
            .map(|m| medication(pid, m, None)),
    );
    out.extend(r.contacts.entries().iter().enumerate().map(|(i, c)| {
        let mut rp = write::related_person(pid, &format!("{pid}-rp{i}"), c);
        source_meta(&mut rp.meta, 1, None);
        Resource::RelatedPerson(rp)
    }));
    for w in &p.withheld {
        out.push(match w {
            Withheld::CodedAlert(a) | Withheld::LocalCodedAlert(a) => flag(pid, a, None),
            Withheld::DmdMedication(m) => medication(pid, m, None),
            Withheld::LabelledMedication(m, label) => medication(pid, m, Some((ACT_CODE, label))),
            Withheld::RestrictedMedication(m) => medication(pid, m, Some((CONFIDENTIALITY, "R"))),
        });
    }
    if let Some(a) = &p.entered_in_error {
        out.push(allergy(pid, a, true));
    }
    for (i, u) in p.unreadable.iter().enumerate() {
        out.push(unreadable(pid, i, *u, p.last_updated));
    }
    if let Some(o) = &p.objection {
        out.extend(consents(pid, o).into_iter().map(Resource::Consent));
    }
    out
}

/// Write `patients` as Bulk Data NDJSON into `dir`: `Patient.ndjson`, `Flag.ndjson`, …
/// Returns the number of resources written per type.
pub fn write_ndjson(
    patients: &[SourcePatient],
    dir: &Path,
) -> std::io::Result<BTreeMap<String, usize>> {
    let mut w = NdjsonWriter::create(dir)?;
    for p in patients {
        w.add(p)?;
    }
    w.finish()
}

/// Bulk Data NDJSON written one patient at a time (an export of any size from a
/// generator, without holding it): `Patient.ndjson`, `Flag.ndjson`, … in a directory.
#[derive(Debug)]
pub struct NdjsonWriter {
    dir: std::path::PathBuf,
    files: BTreeMap<String, (BufWriter<File>, usize)>,
}

impl NdjsonWriter {
    /// Write into `dir` (created if needed).
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
            files: BTreeMap::new(),
        })
    }

    /// Append one patient's resources.
    pub fn add(&mut self, p: &SourcePatient) -> std::io::Result<()> {
        for r in typed_resources(p) {
            let entry = match self.files.entry(r.kind().to_owned()) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    let f = File::create(self.dir.join(format!("{}.ndjson", e.key())))?;
                    e.insert((BufWriter::new(f), 0))
                }
            };
            serde_json::to_writer(&mut entry.0, &r)?;
            entry.0.write_all(b"\n")?;
            entry.1 += 1;
        }
        Ok(())
    }

    /// Flush and sync every file; the number of resources written per type.
    pub fn finish(self) -> std::io::Result<BTreeMap<String, usize>> {
        let mut counts = BTreeMap::new();
        for (kind, (mut w, n)) in self.files {
            w.flush()?;
            w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            counts.insert(kind, n);
        }
        Ok(counts)
    }
}

/// What a source system adds to an item's `meta`: its version, the `HTEST` label, and any
/// further label.
fn source_meta(meta: &mut Option<Meta>, version: u64, extra_label: Option<(&str, &str)>) {
    let m = meta.get_or_insert_with(Meta::default);
    m.version_id = Some(version.to_string());
    m.security.push(Coding::new(ACT_REASON, "HTEST"));
    if let Some((system, code)) = extra_label {
        m.security.push(Coding::new(system, code));
    }
}

fn plain_meta(at: Timestamp) -> Option<Meta> {
    Some(Meta {
        version_id: Some("1".into()),
        last_updated: Some(at.rfc3339()),
        security: vec![Coding::new(ACT_REASON, "HTEST")],
        ..Meta::default()
    })
}

fn patient(p: &SourcePatient) -> Resource {
    let r = &p.expected;
    let mut v = write::patient(&p.fhir_id, &r.nhs_number, &r.demographics);
    source_meta(&mut v.meta, 1, None);
    if let Some(m) = v.meta.as_mut() {
        m.last_updated = Some(p.last_updated.rfc3339());
    }
    Resource::Patient(v)
}

fn flag(pid: &str, a: &sync_protocol::record::Alert, label: Option<(&str, &str)>) -> Resource {
    let mut f = write::flag(pid, a);
    source_meta(&mut f.meta, 1, label);
    Resource::Flag(f)
}

fn allergy(pid: &str, a: &Allergy, entered_in_error: bool) -> Resource {
    let mut r = write::allergy(pid, a);
    source_meta(&mut r.meta, 1, None);
    if entered_in_error {
        r.verification_status = Some(CodeableConcept::coded(Coding::new(
            codes::ALLERGY_VERIFICATION_SYSTEM,
            "entered-in-error",
        )));
        // R4 (ait-1/ait-2): no clinicalStatus when entered in error.
        r.clinical_status = None;
    }
    Resource::AllergyIntolerance(r)
}

fn medication(
    pid: &str,
    m: &sync_protocol::record::Medication,
    label: Option<(&str, &str)>,
) -> Resource {
    let mut r = write::medication(pid, m);
    // Some sources export a structured dose without its words (every other such
    // medication, by id): the hub writes them.
    if m.dosage.is_some() && m.source_id.as_str().len().is_multiple_of(2) {
        for d in &mut r.dosage {
            d.text = None;
        }
    }
    source_meta(&mut r.meta, 1, label);
    Resource::MedicationStatement(r)
}

fn unavailable_allergies(pid: &str, at: Timestamp) -> Resource {
    Resource::List(model::List {
        id: Some(format!("{pid}-allergies")),
        meta: plain_meta(at),
        status: Some("current".into()),
        mode: Some("snapshot".into()),
        code: Some(CodeableConcept::coded(
            Coding::new(SNOMED, codes::ALLERGY_LIST_CODE)
                .display("Allergies and adverse reactions"),
        )),
        subject: Some(write::subject(pid)),
        empty_reason: Some(CodeableConcept::coded(Coding::new(
            codes::LIST_EMPTY_REASON,
            "unavailable",
        ))),
        note: vec![Annotation {
            text: "Information not available.".into(),
        }],
    })
}

/// An item written so that no mapper can show it (valid FHIR, nothing to read).
fn unreadable(pid: &str, i: usize, u: UnreadableItem, at: Timestamp) -> Resource {
    match u {
        UnreadableItem::Alert => Resource::Flag(model::Flag {
            id: Some(format!("{pid}-odd{i}")),
            meta: plain_meta(at),
            status: Some("active".into()),
            code: Some(CodeableConcept::coded(Coding::new(
                LOCAL_ALERT_SYSTEM,
                "ZZ999",
            ))),
            subject: Some(write::subject(pid)),
            ..model::Flag::default()
        }),
        UnreadableItem::Medication => Resource::MedicationStatement(model::MedicationStatement {
            id: Some(format!("{pid}-odd{i}")),
            meta: plain_meta(at),
            status: Some("active".into()),
            medication_reference: Some(Reference::to(format!("Medication/{pid}-m{i}"))),
            subject: Some(write::subject(pid)),
            ..model::MedicationStatement::default()
        }),
    }
}

/// A date as a Consent shape writes it.
fn consent_date(at: Timestamp, shape: ConsentDate) -> Option<String> {
    let full = at.rfc3339();
    let day = full.get(..10).unwrap_or("2024-01-01").to_owned();
    Some(match shape {
        ConsentDate::Instant => full,
        ConsentDate::NoZone => full.get(..19).unwrap_or(&full).to_owned(),
        ConsentDate::Date => day,
        ConsentDate::YearMonth => day.get(..7).unwrap_or(&day).to_owned(),
        ConsentDate::Year => day.get(..4).unwrap_or(&day).to_owned(),
        ConsentDate::Absent => return None,
    })
}

fn privacy_consent(pid: &str, id: String, meta: Meta) -> Consent {
    Consent {
        id: Some(id),
        meta: Some(meta),
        status: None,
        scope: Some(CodeableConcept::coded(Coding::new(
            codes::CONSENT_SCOPE,
            "patient-privacy",
        ))),
        category: vec![CodeableConcept::coded(Coding::new(ACT_CODE, "INFA"))],
        patient: Some(write::subject(pid)),
        date_time: None,
        policy_rule: Some(CodeableConcept::coded(Coding::new(ACT_CODE, "OPTOUT"))),
        provision: None,
    }
}

/// The Consent resources of an objection, in its shape.
fn consents(pid: &str, o: &Objection) -> Vec<Consent> {
    let treat = vec![Coding::new(ACT_REASON, "TREAT")];
    let deny = |extra: FhirProvision| FhirProvision {
        kind: Some("deny".into()),
        purpose: treat.clone(),
        ..extra
    };
    let provision = match &o.provision {
        Provision::Deny => deny(FhirProvision::default()),
        Provision::DenyClasses(classes) => deny(FhirProvision {
            class: classes
                .iter()
                .map(|c| Coding::new(codes::RESOURCE_TYPES, c))
                .collect(),
            ..FhirProvision::default()
        }),
        Provision::DenyCode => deny(FhirProvision {
            code: vec![CodeableConcept::coded(
                Coding::new(SNOMED, "61460002").display("Immunization record"),
            )],
            ..FhirProvision::default()
        }),
        Provision::Untyped => FhirProvision {
            purpose: treat.clone(),
            ..FhirProvision::default()
        },
    };
    let mut c = privacy_consent(
        pid,
        format!("{pid}-objection"),
        Meta {
            version_id: Some(if o.withdrawn { "2" } else { "1" }.into()),
            security: vec![Coding::new(ACT_REASON, "HTEST")],
            ..Meta::default()
        },
    );
    c.provision = Some(provision);
    c.status = match o.status {
        ConsentStatus::Given => Some(if o.withdrawn { "inactive" } else { "active" }.into()),
        ConsentStatus::Proposed => Some("proposed".into()),
        ConsentStatus::Missing => None,
    };
    if let Some(d) = consent_date(o.recorded_at, o.date) {
        c.date_time = Some(d);
        if let Some(m) = c.meta.as_mut() {
            m.last_updated = Some(o.recorded_at.rfc3339());
        }
    }
    let mut out = vec![c];
    if let Some(w) = o.later_withdrawal {
        // A second Consent withdrawing the first: a day and a year later with a full
        // date (clearly after), or dated only to the objection's own year (ambiguous).
        let later = Timestamp::from_millis(o.recorded_at.as_millis() + 400 * 86_400_000)
            .unwrap_or(o.recorded_at);
        let date = match w {
            LaterWithdrawal::ClearlyLater => later.rfc3339(),
            LaterWithdrawal::Ambiguous => o
                .recorded_at
                .rfc3339()
                .get(..4)
                .unwrap_or("2024")
                .to_owned(),
        };
        let mut withdrawal = privacy_consent(
            pid,
            format!("{pid}-withdrawal"),
            Meta {
                version_id: Some("1".into()),
                last_updated: Some(later.rfc3339()),
                security: vec![Coding::new(ACT_REASON, "HTEST")],
                ..Meta::default()
            },
        );
        withdrawal.status = Some("inactive".into());
        withdrawal.date_time = Some(date);
        withdrawal.provision = Some(FhirProvision {
            kind: Some("deny".into()),
            ..FhirProvision::default()
        });
        out.push(withdrawal);
    }
    out
}

/// Test support: validates NDJSON `files` (each named after its resource type, e.g.
/// `AuditEvent.ndjson`) with `fhir.resources` through `scripts/validate_fhir.py`. Returns
/// whether all are valid and the validator's report (never the resources). Panics if
/// python3 or `fhir.resources` is missing: the test environment is broken.
#[allow(
    clippy::expect_used,
    reason = "test support: no validator is a broken environment"
)]
pub fn validate(files: &[std::path::PathBuf]) -> (bool, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/validate_fhir.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .args(files)
        .output()
        .expect("python3 is needed for the FHIR validator (.ci/run installs fhir.resources)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("ModuleNotFoundError"),
        "fhir.resources is not installed: pip install 'fhir.resources>=8' ({text})"
    );
    (out.status.success(), text)
}
