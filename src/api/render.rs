//! What the local API answers with: FHIR R4 resources, search and document Bundles,
//! OperationOutcomes and the CapabilityStatement; and the plain JSON summary.
//!
//! Safety-relevant absences are explicit everywhere: a section the source could not
//! provide says "not available"; an empty one says "none recorded" (which is not "no
//! known allergies": that is an entry of its own); a section outside the caller's view
//! says so; withheld items show only the standard confidentiality warning.
#![allow(
    clippy::indexing_slicing,
    reason = "serde_json IndexMut with a str key inserts into objects built just above by json!; it cannot panic"
)]

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sync_protocol::audit::{SectionKind, SectionShown, Shown as ShownSection};
use sync_protocol::message::View;
use sync_protocol::record::{
    Alert, AlertCategory, AlertSeverity, Allergy, AllergyVerification, ContactRole, Criticality,
    Medication, Section, Sex,
};
use sync_protocol::types::Timestamp;

use crate::fhir::{self, instant};
use crate::policy::Shown;

/// The standard text for items removed for confidentiality.
pub const WITHHELD_WARNING: &str =
    "Items excluded due to confidentiality and/or patient preferences.";

const FRESHNESS_SYSTEM: &str = "https://carecache.invalid/fhir/CodeSystem/data-freshness";
/// carecache's own section codes, for a `$summary` section no LOINC code names.
const SECTION_SYSTEM: &str = "https://carecache.invalid/fhir/CodeSystem/summary-section";
const LOINC: &str = "http://loinc.org";
const XHTML: &str = "http://www.w3.org/1999/xhtml";

/// How fresh the data is.
#[derive(Clone, Copy, Debug)]
pub struct Freshness {
    /// Trusted time of the last successful sync, if any.
    pub last_sync: Option<Timestamp>,
    /// Older than the configured threshold (or never synced).
    pub stale: bool,
    /// The threshold, in seconds.
    pub stale_after_secs: u64,
}

impl Freshness {
    /// For JSON bodies.
    pub fn json(&self) -> Value {
        json!({
            "last_sync": self.last_sync.map(instant),
            "stale": self.stale,
            "stale_after_secs": self.stale_after_secs,
        })
    }

    fn words(&self) -> String {
        match self.last_sync {
            Some(t) if self.stale => format!(
                "Data last synchronised {} — older than {} minutes, may be out of date",
                instant(t),
                self.stale_after_secs / 60
            ),
            Some(t) => format!("Data last synchronised {}", instant(t)),
            None => "Data has never been synchronised on this device".to_owned(),
        }
    }

    /// A `meta.tag` coding saying fresh or stale, with the last sync time in words.
    fn tag(&self) -> Value {
        json!({
            "system": FRESHNESS_SYSTEM,
            "code": if self.stale { "stale" } else { "fresh" },
            "display": self.words(),
        })
    }
}

/// Adds the freshness tag to a resource's `meta`.
pub fn tag(resource: &mut Value, f: &Freshness) {
    let Some(obj) = resource.as_object_mut() else {
        return;
    };
    let meta = obj.entry("meta").or_insert_with(|| json!({}));
    if let Some(m) = meta.as_object_mut() {
        let tags = m.entry("tag").or_insert_with(|| json!([]));
        if let Some(list) = tags.as_array_mut() {
            list.push(f.tag());
        }
    }
}

/// An OperationOutcome with one issue.
pub fn operation_outcome(severity: &str, code: &str, text: &str) -> Value {
    json!({
        "resourceType": "OperationOutcome",
        "issue": [{ "severity": severity, "code": code, "diagnostics": text, "details": { "text": text } }],
    })
}

fn xhtml(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 48);
    out.push_str("<div xmlns=\"");
    out.push_str(XHTML);
    out.push_str("\">");
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out.push_str("</div>");
    out
}

fn narrative(text: &str) -> Value {
    json!({ "status": "generated", "div": xhtml(text) })
}

/// A deterministic `urn:uuid:` for a resource in a Bundle (SHA-256 of its type and id,
/// shaped as a version-8 UUID).
fn urn(kind: &str, id: &str) -> String {
    let h = Sha256::digest(format!("{kind}/{id}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(h.get(..16).unwrap_or(&[0; 16]));
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    let x = hex::encode(b);
    format!(
        "urn:uuid:{}-{}-{}-{}-{}",
        &x[0..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

/// Alerts most severe first (high risk, warning, information), stable otherwise.
pub fn alerts_by_severity(shown: &Shown) -> Vec<&Alert> {
    let mut a: Vec<&Alert> = shown.alerts.entries().iter().collect();
    a.sort_by_key(|x| std::cmp::Reverse(x.severity));
    a
}

/// The audit's word for a section. A section withheld at the patient's request showed
/// nothing, which the audit format (unchanged since v1) records as "not available".
fn section_shown<T, const N: usize>(s: &Section<T, N>) -> SectionShown {
    match s {
        Section::NotAvailable | Section::WithheldByPatient => SectionShown::NotAvailable,
        Section::NoneRecorded => SectionShown::NoneRecorded,
        Section::Entries(e) => SectionShown::Items(u16::try_from(e.len()).unwrap_or(u16::MAX)),
    }
}

/// What a whole-record answer shows, for the audit entry.
pub fn shown_all(s: &Shown) -> Vec<ShownSection> {
    let mut out = vec![
        ShownSection {
            section: SectionKind::Demographics,
            shown: SectionShown::Items(1),
        },
        ShownSection {
            section: SectionKind::Alerts,
            shown: section_shown(&s.alerts),
        },
    ];
    if let Some(c) = &s.clinical {
        out.push(ShownSection {
            section: SectionKind::Allergies,
            shown: section_shown(&c.allergies),
        });
        out.push(ShownSection {
            section: SectionKind::Medications,
            shown: section_shown(&c.medications),
        });
    }
    out.push(ShownSection {
        section: SectionKind::Contacts,
        shown: section_shown(&s.contacts),
    });
    out
}

/// One section's audit line.
pub fn shown_one(kind: SectionKind, s: &Shown) -> Vec<ShownSection> {
    let shown = match (kind, &s.clinical) {
        (SectionKind::Demographics, _) => SectionShown::Items(1),
        (SectionKind::Alerts, _) => section_shown(&s.alerts),
        (SectionKind::Contacts, _) => section_shown(&s.contacts),
        (SectionKind::Allergies, Some(c)) => section_shown(&c.allergies),
        (SectionKind::Medications, Some(c)) => section_shown(&c.medications),
        (SectionKind::Allergies | SectionKind::Medications, None) => SectionShown::Items(0),
    };
    vec![ShownSection {
        section: kind,
        shown,
    }]
}

/// `GET /fhir/Patient/{id}`: the UK Core Patient with the freshness tag.
pub fn patient(s: &Shown, f: &Freshness) -> Value {
    let mut p = fhir::patient_parts(&s.nhs_number, &s.demographics);
    tag(&mut p, f);
    p
}

/// Most entries one searchset page holds.
pub const MAX_COUNT: usize = 1_000;

/// A FHIR search's `_count` (none: every match) and `_offset`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Paging {
    /// Entries per page; 0 asks for the total only.
    pub count: Option<usize>,
    /// Matches skipped.
    pub offset: usize,
}

/// A searchset page: `entries` (every match, in order) cut to the page, with `total`,
/// `self` and — if more matches follow — `next` links (`base` is the server's absolute
/// base, `query` the search without paging). Notes about the section (OperationOutcome
/// entries) travel on the first page.
fn searchset(
    entries: Vec<Value>,
    notes: Vec<Value>,
    f: &Freshness,
    now: Timestamp,
    page: Paging,
    link: (&str, &str),
) -> Value {
    let total = entries.len();
    let count = page.count.unwrap_or(total.max(1));
    let (base, query) = link;
    let url = |offset: usize| {
        let mut u = format!("{base}{query}");
        if page.count.is_some() || offset > 0 {
            u.push_str(&format!("&_count={count}&_offset={offset}"));
        }
        u
    };
    let mut links = vec![json!({ "relation": "self", "url": url(page.offset) })];
    if count > 0 && page.offset.saturating_add(count) < total {
        links.push(json!({ "relation": "next", "url": url(page.offset + count) }));
    }
    let notes = if page.offset == 0 { notes } else { Vec::new() };
    let entries: Vec<Value> = entries.into_iter().skip(page.offset).take(count).collect();
    let mut list: Vec<Value> = entries
        .into_iter()
        .map(|r| {
            let kind = r["resourceType"].as_str().unwrap_or("Resource").to_owned();
            let id = r["id"].as_str().unwrap_or("").to_owned();
            json!({ "fullUrl": urn(&kind, &id), "resource": r, "search": { "mode": "match" } })
        })
        .collect();
    let mut notes = notes;
    if f.stale {
        notes.push(operation_outcome("warning", "informational", &f.words()));
    }
    for (i, n) in notes.into_iter().enumerate() {
        list.push(json!({ "fullUrl": urn("OperationOutcome", &format!("note-{i}")), "resource": n, "search": { "mode": "outcome" } }));
    }
    let mut b = json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "timestamp": instant(now),
        "total": total,
        "link": links,
        "entry": list,
    });
    tag(&mut b, f);
    b
}

/// `GET /fhir/Patient?identifier=…`.
pub fn patient_search(s: &Shown, f: &Freshness, now: Timestamp, page: Paging, base: &str) -> Value {
    let query = format!(
        "/fhir/Patient?identifier=https://fhir.nhs.uk/Id/nhs-number%7C{}",
        s.nhs_number.digits()
    );
    searchset(
        vec![patient(s, f)],
        Vec::new(),
        f,
        now,
        page,
        (base, &query),
    )
}

/// "1 alert could not be displayed — check the source record", for a section with items
/// the hub could not read.
pub fn could_not_show(unreadable: u16, noun: (&str, &str)) -> Option<String> {
    (unreadable > 0).then(|| {
        format!(
            "{unreadable} {} could not be displayed — check the source record",
            if unreadable == 1 { noun.0 } else { noun.1 }
        )
    })
}

/// Nouns for the sections, singular and plural.
pub const ALERT_NOUN: (&str, &str) = ("alert", "alerts");
/// See [`ALERT_NOUN`].
pub const ALLERGY_NOUN: (&str, &str) = ("allergy", "allergies");
/// See [`ALERT_NOUN`].
pub const MEDICATION_NOUN: (&str, &str) = ("medication", "medications");
/// See [`ALERT_NOUN`].
pub const CONTACT_NOUN: (&str, &str) = ("contact", "contacts");

/// Words for a section withheld at the patient's request.
fn withheld_by_patient(what: &str) -> String {
    format!("{what}: withheld at the patient's request")
}

fn section_note<T, const N: usize>(
    section: &Section<T, N>,
    what: &str,
    withheld: u16,
    unreadable: u16,
    noun: (&str, &str),
) -> Vec<Value> {
    let mut notes = Vec::new();
    match section {
        Section::NotAvailable => notes.push(operation_outcome(
            "warning",
            "incomplete",
            &format!("{what}: information not available from the source"),
        )),
        Section::NoneRecorded => notes.push(operation_outcome(
            "information",
            "informational",
            &format!("{what}: none recorded at the source"),
        )),
        Section::WithheldByPatient => notes.push(operation_outcome(
            "warning",
            "suppressed",
            &withheld_by_patient(what),
        )),
        Section::Entries(_) => {}
    }
    if let Some(words) = could_not_show(unreadable, noun) {
        notes.push(operation_outcome("warning", "incomplete", &words));
    }
    if withheld > 0 {
        notes.push(operation_outcome("warning", "suppressed", WITHHELD_WARNING));
    }
    notes
}

/// `GET /fhir/Flag|AllergyIntolerance|MedicationStatement?patient=…`: a searchset of
/// one section's items (alerts most severe first), with "not available", "none recorded"
/// and withheld items as OperationOutcome entries. `None` when the section is not part
/// of the caller's view (or not a searchable section).
pub fn section_bundle(
    kind: SectionKind,
    s: &Shown,
    f: &Freshness,
    now: Timestamp,
    page: Paging,
    base: &str,
) -> Option<Value> {
    let id = s.nhs_number.digits();
    let resource = match kind {
        SectionKind::Allergies => "AllergyIntolerance",
        SectionKind::Medications => "MedicationStatement",
        _ => "Flag",
    };
    let query = format!("/fhir/{resource}?patient=Patient/{id}");
    let (entries, notes) = match (kind, &s.clinical) {
        (SectionKind::Alerts, _) => (
            alerts_by_severity(s)
                .into_iter()
                .map(|a| fhir::flag(&id, a))
                .collect(),
            section_note(
                &s.alerts,
                "Alerts",
                s.withheld,
                s.unreadable.alerts,
                ALERT_NOUN,
            ),
        ),
        (SectionKind::Allergies, Some(c)) => (
            c.allergies
                .entries()
                .iter()
                .map(|a| fhir::allergy(&id, a))
                .collect(),
            section_note(
                &c.allergies,
                "Allergies",
                s.withheld,
                s.unreadable.allergies,
                ALLERGY_NOUN,
            ),
        ),
        (SectionKind::Medications, Some(c)) => (
            c.medications
                .entries()
                .iter()
                .map(|m| fhir::medication(&id, m))
                .collect(),
            section_note(
                &c.medications,
                "Medications",
                s.withheld,
                s.unreadable.medications,
                MEDICATION_NOUN,
            ),
        ),
        _ => return None,
    };
    Some(searchset(entries, notes, f, now, page, (base, &query)))
}

/// A Composition section: entries referenced by their Bundle `fullUrl`s, or an empty
/// section that says why.
fn comp_section<T, const N: usize>(
    title: &str,
    loinc: (&str, &str),
    section: Option<&Section<T, N>>,
    refs: Vec<String>,
    summary: &str,
    not_shown: Option<String>,
) -> Value {
    let mut v = json!({
        "title": title,
        "code": { "coding": [{ "system": LOINC, "code": loinc.0, "display": loinc.1 }] },
    });
    let with_note = |text: String| match &not_shown {
        Some(n) => format!("{text} {n}."),
        None => text,
    };
    match section {
        Some(Section::Entries(_)) => {
            v["text"] = narrative(&with_note(summary.to_owned()));
            v["entry"] = json!(
                refs.into_iter()
                    .map(|r| json!({ "reference": r }))
                    .collect::<Vec<_>>()
            );
        }
        Some(Section::NoneRecorded) => {
            // The source holds nothing: "nil known" (list-empty-reason `nilknown`), which
            // the narrative says is not a clinical statement that the patient has none.
            v["text"] = narrative(&with_note(format!(
                "{title}: none recorded at the source. This is not a statement that the patient has none."
            )));
            v["emptyReason"] = json!({ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/list-empty-reason", "code": "nilknown", "display": "Nil Known" }] });
        }
        Some(Section::NotAvailable) => {
            v["text"] = narrative(&with_note(format!(
                "{title}: information not available from the source."
            )));
            v["emptyReason"] = json!({ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/list-empty-reason", "code": "unavailable", "display": "Unavailable" }] });
        }
        Some(Section::WithheldByPatient) => {
            v["text"] = narrative(&format!("{}.", withheld_by_patient(title)));
            v["emptyReason"] = json!({ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/list-empty-reason", "code": "withheld", "display": "Information Withheld" }] });
        }
        None => {
            v["text"] = narrative(&format!("{title}: not part of your view of this record."));
            v["emptyReason"] = json!({ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/list-empty-reason", "code": "withheld", "display": "Information Withheld" }] });
        }
    }
    v
}

/// `GET /fhir/Patient/{id}/$summary`: a document Bundle whose Composition lists alerts
/// first, then allergies, then medications.
pub fn summary(
    s: &Shown,
    f: &Freshness,
    now: Timestamp,
    device_label: &str,
    request_id: u64,
) -> Value {
    let id = s.nhs_number.digits();
    let patient = patient(s, f);
    let patient_url = urn("Patient", &id);
    let mut resources: Vec<(String, Value)> = Vec::new();
    let mut alert_refs = Vec::new();
    let mut alert_lines = Vec::new();
    for a in alerts_by_severity(s) {
        let r = fhir::flag(&id, a);
        let url = urn("Flag", r["id"].as_str().unwrap_or(""));
        alert_refs.push(url.clone());
        alert_lines.push(format!("{}{}", severity_word(a.severity), alert_text(a)));
        resources.push((url, r));
    }
    let mut sections = vec![comp_section(
        "Alerts",
        ("104605-1", "Alert"),
        Some(&s.alerts),
        alert_refs,
        &alert_lines.join("; "),
        could_not_show(s.unreadable.alerts, ALERT_NOUN),
    )];
    match &s.clinical {
        Some(c) => {
            let mut refs = Vec::new();
            let mut lines = Vec::new();
            for a in c.allergies.entries() {
                let r = fhir::allergy(&id, a);
                let url = urn("AllergyIntolerance", r["id"].as_str().unwrap_or(""));
                refs.push(url.clone());
                lines.push(allergy_text(a));
                resources.push((url, r));
            }
            sections.push(comp_section(
                "Allergies and adverse reactions",
                ("48765-2", "Allergies and adverse reactions Document"),
                Some(&c.allergies),
                refs,
                &lines.join("; "),
                could_not_show(s.unreadable.allergies, ALLERGY_NOUN),
            ));
            let mut refs = Vec::new();
            let mut lines = Vec::new();
            for m in c.medications.entries() {
                let r = fhir::medication(&id, m);
                let url = urn("MedicationStatement", r["id"].as_str().unwrap_or(""));
                refs.push(url.clone());
                lines.push(medication_text(m));
                resources.push((url, r));
            }
            sections.push(comp_section(
                "Medications",
                ("10160-0", "History of Medication use Narrative"),
                Some(&c.medications),
                refs,
                &lines.join("; "),
                could_not_show(s.unreadable.medications, MEDICATION_NOUN),
            ));
        }
        None => {
            sections.push(comp_section::<Allergy, 1>(
                "Allergies and adverse reactions",
                ("48765-2", "Allergies and adverse reactions Document"),
                None,
                Vec::new(),
                "",
                None,
            ));
            sections.push(comp_section::<Medication, 1>(
                "Medications",
                ("10160-0", "History of Medication use Narrative"),
                None,
                Vec::new(),
                "",
                None,
            ));
        }
    }
    if s.withheld > 0 {
        sections.push(json!({
            "title": "Withheld items",
            "code": { "coding": [{ "system": SECTION_SYSTEM, "code": "withheld-items", "display": "Items withheld for confidentiality" }] },
            "text": narrative(WITHHELD_WARNING),
            "emptyReason": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/list-empty-reason", "code": "withheld", "display": "Information Withheld" }] },
        }));
    }
    let comp_id = format!("summary-{id}-{request_id}");
    let mut composition = json!({
        "resourceType": "Composition",
        "id": comp_id,
        "status": "final",
        "type": { "coding": [{ "system": LOINC, "code": "60591-5", "display": "Patient summary Document" }] },
        "subject": { "reference": patient_url, "display": s.nhs_number.to_string() },
        "date": instant(now),
        "author": [{ "display": format!("carecache ({device_label})") }],
        "title": "Patient summary (alerts, allergies, medications)",
        "confidentiality": if s.demographics.restricted { "R" } else { "N" },
        "section": sections,
    });
    tag(&mut composition, f);
    let comp_url = urn("Composition", &comp_id);
    let mut entry = vec![
        json!({ "fullUrl": comp_url, "resource": composition }),
        json!({ "fullUrl": patient_url, "resource": patient }),
    ];
    entry.extend(
        resources
            .into_iter()
            .map(|(url, r)| json!({ "fullUrl": url, "resource": r })),
    );
    let mut b = json!({
        "resourceType": "Bundle",
        "identifier": { "system": "urn:ietf:rfc:3986", "value": urn("Bundle", &format!("{id}-{request_id}")) },
        "type": "document",
        "timestamp": instant(now),
        "entry": entry,
    });
    tag(&mut b, f);
    b
}

fn severity_word(s: AlertSeverity) -> &'static str {
    match s {
        AlertSeverity::HighRisk => "HIGH RISK: ",
        AlertSeverity::Warning => "Warning: ",
        AlertSeverity::Information => "",
    }
}

fn alert_text(a: &Alert) -> String {
    match &a.detail {
        Some(d) => format!("{} ({})", a.code.display.as_str(), d.as_str()),
        None => a.code.display.as_str().to_owned(),
    }
}

fn allergy_text(a: &Allergy) -> String {
    let mut t = a.substance.display.as_str().to_owned();
    if a.criticality == Some(Criticality::High) {
        t.push_str(" (high criticality)");
    }
    match a.verification {
        Some(AllergyVerification::Confirmed) | None => {}
        Some(v) => t.push_str(&format!(" ({})", v.code().0)),
    }
    t
}

fn medication_text(m: &Medication) -> String {
    match &m.dose_text {
        Some(d) => format!("{} — {}", m.medicine.display.as_str(), d.as_str()),
        None => m.medicine.display.as_str().to_owned(),
    }
}

/// The CapabilityStatement (`GET /fhir/metadata`).
pub fn capability_statement(now: Timestamp) -> Value {
    let search_patient = json!([{ "name": "patient", "type": "reference", "documentation": "The patient: Patient/{NHS number} or the NHS number" }]);
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": instant(now),
        "publisher": "carecache",
        "kind": "instance",
        "software": { "name": "carecache", "version": env!("CARGO_PKG_VERSION") },
        "implementation": { "description": "carecache local read-only cache of alerts, allergies and medications" },
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json"],
        "rest": [{
            "mode": "server",
            "documentation": "Every request needs a client token (Authorization: Bearer), the acting user's staff id (X-Carecache-User) and a purpose of use (X-Carecache-Purpose: TREAT, or ETREAT with X-Carecache-Reason). Every access, served or denied, is audited.",
            "security": { "cors": false, "description": "Bearer token issued by `carecache clients add`; loopback or local socket only." },
            "resource": [
                {
                    "type": "Patient",
                    "profile": "https://fhir.hl7.org.uk/StructureDefinition/UKCore-Patient",
                    "interaction": [{ "code": "read" }, { "code": "search-type" }],
                    "searchParam": [{ "name": "identifier", "type": "token", "documentation": "https://fhir.nhs.uk/Id/nhs-number|{NHS number}" }],
                    "operation": [{ "name": "summary", "definition": "http://hl7.org/fhir/uv/ips/OperationDefinition/summary" }],
                },
                { "type": "Flag", "profile": "https://fhir.hl7.org.uk/StructureDefinition/UKCore-Flag", "interaction": [{ "code": "search-type" }], "searchParam": search_patient },
                { "type": "AllergyIntolerance", "profile": "https://fhir.hl7.org.uk/StructureDefinition/UKCore-AllergyIntolerance", "interaction": [{ "code": "search-type" }], "searchParam": search_patient },
                { "type": "MedicationStatement", "profile": "https://fhir.hl7.org.uk/StructureDefinition/UKCore-MedicationStatement", "interaction": [{ "code": "search-type" }], "searchParam": search_patient },
            ],
        }],
    })
}

// ---- plain JSON ---------------------------------------------------------------------

fn json_section<T, const N: usize>(
    s: &Section<T, N>,
    what: &str,
    unreadable: (u16, (&str, &str)),
    item: impl Fn(&T) -> Value,
) -> Value {
    let mut v = json_section_state(s, what, item);
    note_unreadable(&mut v, unreadable.0, unreadable.1);
    v
}

/// Adds `could_not_show` to a JSON section when the hub could not read some of its items.
fn note_unreadable(section: &mut Value, unreadable: u16, noun: (&str, &str)) {
    if let Some(words) = could_not_show(unreadable, noun) {
        section["could_not_show"] = json!({ "count": unreadable, "message": words });
    }
}

fn json_section_state<T, const N: usize>(
    s: &Section<T, N>,
    what: &str,
    item: impl Fn(&T) -> Value,
) -> Value {
    match s {
        Section::NotAvailable => json!({
            "state": "not_available",
            "message": format!("{what}: information not available from the source"),
            "items": [],
        }),
        Section::NoneRecorded => json!({
            "state": "none_recorded",
            "message": format!("{what}: none recorded at the source (not the same as 'none known')"),
            "items": [],
        }),
        Section::Entries(items) => json!({
            "state": "entries",
            "items": items.iter().map(item).collect::<Vec<_>>(),
        }),
        Section::WithheldByPatient => json!({
            "state": "withheld_by_patient",
            "message": withheld_by_patient(what),
            "items": [],
        }),
    }
}

fn not_in_view(what: &str) -> Value {
    json!({
        "state": "not_in_view",
        "message": format!("{what}: not part of your view of this record"),
        "items": [],
    })
}

fn source(p: &sync_protocol::types::Provenance) -> Value {
    json!({
        "organisation": p.organisation.as_ref().map(|o| o.as_str()),
        "recorded_by": p.recorded_by.as_ref().map(|r| r.as_str()),
        "last_updated": p.last_updated.map(instant),
    })
}

/// A coded concept for JSON: the system it came from and its code, or text only.
fn code_json(c: &sync_protocol::types::Coding) -> Value {
    match &c.code {
        Some(code) => {
            json!({ "system": code.system(), "system_name": code.system_name(), "code": code.value() })
        }
        None => json!({ "system": null, "system_name": "text only", "code": null }),
    }
}

fn alert_json(a: &Alert) -> Value {
    json!({
        "severity": match a.severity {
            AlertSeverity::HighRisk => "high_risk",
            AlertSeverity::Warning => "warning",
            AlertSeverity::Information => "information",
        },
        "category": match a.category {
            AlertCategory::CommunicationNeed => "communication_need",
            AlertCategory::ReasonableAdjustment => "reasonable_adjustment",
            AlertCategory::ClinicalWarning => "clinical_warning",
            AlertCategory::TreatmentRestriction => "treatment_restriction",
            AlertCategory::Safeguarding => "safeguarding",
            AlertCategory::EndOfLife => "end_of_life",
            AlertCategory::Other => "other",
        },
        "text": alert_text(a),
        "snomed": a.code.sctid().map(|c| c.to_string()),
        "coding": code_json(&a.code),
        "start": a.period.start.map(|d| d.to_string()),
        "end": a.period.end.map(|d| d.to_string()),
        "source": source(&a.provenance),
    })
}

fn allergy_json(a: &Allergy) -> Value {
    json!({
        "substance": a.substance.display.as_str(),
        "snomed": a.substance.sctid().map(|c| c.to_string()),
        "coding": code_json(&a.substance),
        "criticality": a.criticality.map(|c| match c {
            Criticality::Low => "low",
            Criticality::High => "high",
            Criticality::UnableToAssess => "unable_to_assess",
        }),
        "status": format!("{:?}", a.status).to_lowercase(),
        "verification": a.verification.map(|v| v.code().0),
        "reactions": a.reactions.iter().map(|r| json!({
            "manifestation": r.manifestation.as_ref().map(|m| m.display.as_str()),
            "description": r.description.as_ref().map(|d| d.as_str()),
            "severity": r.severity.map(|s| format!("{s:?}").to_lowercase()),
        })).collect::<Vec<_>>(),
        "note": a.note.as_ref().map(|n| n.as_str()),
        "source": source(&a.provenance),
    })
}

fn medication_json(m: &Medication) -> Value {
    json!({
        "medicine": m.medicine.display.as_str(),
        "code": m.medicine.code.as_ref().map(sync_protocol::types::Code::value),
        "coding": code_json(&m.medicine),
        "dose": m.dose_text.as_ref().map(|d| d.as_str()),
        "status": format!("{:?}", m.status).to_lowercase(),
        "course": m.course.map(|c| format!("{c:?}").to_lowercase()),
        "started": m.started.map(|d| d.to_string()),
        "ended": m.ended.map(|d| d.to_string()),
        "last_issued": m.last_issued.map(|d| d.to_string()),
        "prescribed_elsewhere": m.prescribed_elsewhere,
        "source": source(&m.provenance),
    })
}

/// The name as one line: "Prefix Given FAMILY".
pub fn display_name(s: &sync_protocol::record::Demographics) -> String {
    let mut out = String::new();
    if let Some(p) = &s.name.prefix {
        out.push_str(p.as_str());
        out.push(' ');
    }
    out.push_str(s.name.given.as_str());
    out.push(' ');
    out.push_str(&s.name.family.as_str().to_uppercase());
    out
}

/// `GET /v1/patients/{nhs}`.
pub fn json_summary(s: &Shown, f: &Freshness, request_id: u64) -> Value {
    let d = &s.demographics;
    let alerts: Vec<Value> = alerts_by_severity(s).into_iter().map(alert_json).collect();
    let mut alerts = match &s.alerts {
        Section::Entries(_) => json!({ "state": "entries", "items": alerts }),
        other => json_section_state(other, "Alerts", alert_json),
    };
    note_unreadable(&mut alerts, s.unreadable.alerts, ALERT_NOUN);
    let (allergies, medications) = match &s.clinical {
        Some(c) => (
            json_section(
                &c.allergies,
                "Allergies",
                (s.unreadable.allergies, ALLERGY_NOUN),
                allergy_json,
            ),
            json_section(
                &c.medications,
                "Medications",
                (s.unreadable.medications, MEDICATION_NOUN),
                medication_json,
            ),
        ),
        None => (not_in_view("Allergies"), not_in_view("Medications")),
    };
    json!({
        "nhs_number": s.nhs_number.to_string(),
        "name": display_name(d),
        "birth_date": d.birth_date.to_string(),
        "sex": match d.sex { Sex::Male => "male", Sex::Female => "female", Sex::Other => "other", Sex::Unknown => "unknown" },
        "restricted": d.restricted,
        "alerts": alerts,
        "allergies": allergies,
        "medications": medications,
        "contacts": json_section(&s.contacts, "Key contacts", (s.unreadable.contacts, CONTACT_NOUN), |c| json!({
            "role": match c.role {
                ContactRole::NextOfKin => "next_of_kin",
                ContactRole::Carer => "carer",
                ContactRole::PowerOfAttorney => "power_of_attorney",
                ContactRole::KeyWorker => "key_worker",
                ContactRole::Other => "other",
            },
            "name": c.name.as_str(),
            "relationship": c.relationship.as_ref().map(|r| r.as_str()),
            "phone": c.phone.as_ref().map(|p| p.as_str()),
        })),
        "withheld": if s.withheld > 0 { json!({ "count": s.withheld, "warning": WITHHELD_WARNING }) } else { Value::Null },
        "access": {
            "lease": s.grant.lease().0,
            "view": match s.grant.view() { View::Clinical => "clinical", View::SocialCare => "social_care" },
            "until": instant(s.grant.until()),
            "emergency": s.grant.emergency(),
        },
        "freshness": f.json(),
        "request_id": request_id.to_string(),
    })
}

/// One row of `GET /v1/patients`.
pub fn json_list_item(s: &Shown) -> Value {
    let high = s
        .alerts
        .entries()
        .iter()
        .filter(|a| a.severity == AlertSeverity::HighRisk)
        .count();
    json!({
        "nhs_number": s.nhs_number.to_string(),
        "name": display_name(&s.demographics),
        "birth_date": s.demographics.birth_date.to_string(),
        "alert_count": s.alerts.entries().len(),
        "high_risk_alert_count": high,
        "access_until": instant(s.grant.until()),
    })
}
