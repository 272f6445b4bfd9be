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
use sync_protocol::audit::{SectionKind, SectionShown, Shown as ShownSection};
use sync_protocol::message::View;
use sync_protocol::record::{
    Alert, AlertCategory, AlertSeverity, Allergy, AllergyVerification, ContactRole, Criticality,
    Medication, Section, Sex,
};
use sync_protocol::types::Timestamp;

use carecache_fhir::codes::{self, FhirCode, LOINC};
use carecache_fhir::document::{self, EmptyReason, narrative, operation_outcome as outcome};
use carecache_fhir::model::{
    self, BundleLink, Coding, Composition, CompositionSection, OperationOutcome, Reference,
    Resource,
};
use carecache_fhir::write;

use crate::policy::Shown;

fn instant(t: Timestamp) -> String {
    carecache_fhir::dates::instant_text(t)
}
/// The standard text for items removed for confidentiality.
pub const WITHHELD_WARNING: &str =
    "Items excluded due to confidentiality and/or patient preferences.";

const FRESHNESS_SYSTEM: &str = "https://carecache.invalid/fhir/CodeSystem/data-freshness";
/// carecache's own section codes, for a `$summary` section no LOINC code names.
const SECTION_SYSTEM: &str = "https://carecache.invalid/fhir/CodeSystem/summary-section";

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
    fn tag(&self) -> Coding {
        Coding::new(FRESHNESS_SYSTEM, if self.stale { "stale" } else { "fresh" })
            .display(&self.words())
    }
}

/// Adds the freshness tag to a resource's `meta`.
pub fn tag(resource: &mut Resource, f: &Freshness) {
    if let Some(m) = resource.meta_mut() {
        m.tag.push(f.tag());
    }
}

/// An OperationOutcome with one issue, as JSON.
pub fn operation_outcome(severity: &str, code: &str, text: &str) -> Value {
    Resource::OperationOutcome(outcome(severity, code, text)).to_json()
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
    patient_resource(s, f).to_json()
}

fn patient_resource(s: &Shown, f: &Freshness) -> Resource {
    let mut p = Resource::Patient(write::patient(
        &s.nhs_number.digits(),
        &s.nhs_number,
        &s.demographics,
    ));
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
    entries: Vec<Resource>,
    notes: Vec<OperationOutcome>,
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
    let link = |relation: &str, offset: usize| BundleLink {
        relation: relation.to_owned(),
        url: url(offset),
    };
    let mut links = vec![link("self", page.offset)];
    if count > 0 && page.offset.saturating_add(count) < total {
        links.push(link("next", page.offset + count));
    }
    let mut notes = if page.offset == 0 { notes } else { Vec::new() };
    if f.stale {
        notes.push(outcome("warning", "informational", &f.words()));
    }
    let entries: Vec<Resource> = entries.into_iter().skip(page.offset).take(count).collect();
    let mut b = Resource::Bundle(Box::new(document::searchset(
        entries,
        notes,
        total,
        links,
        instant(now),
    )));
    tag(&mut b, f);
    b.to_json()
}

/// `GET /fhir/Patient?identifier=…`.
pub fn patient_search(s: &Shown, f: &Freshness, now: Timestamp, page: Paging, base: &str) -> Value {
    let query = format!(
        "/fhir/Patient?identifier={}%7C{}",
        codes::NHS_NUMBER_SYSTEM,
        s.nhs_number.digits()
    );
    searchset(
        vec![patient_resource(s, f)],
        Vec::new(),
        f,
        now,
        page,
        (base, &query),
    )
}

/// `GET /fhir/Patient?family=…`: the matches of a demographic search, best first, each
/// with `search.score`; `notice` (check the match with the patient) as an
/// OperationOutcome on the first page. `query` is the search for the paging links.
pub fn patient_matches(
    matches: &[(&Shown, f64)],
    f: &Freshness,
    now: Timestamp,
    page: Paging,
    link: (&str, &str),
    notice: &str,
) -> Value {
    let mut bundle = searchset(
        matches
            .iter()
            .map(|(s, _)| patient_resource(s, f))
            .collect(),
        vec![outcome("information", "informational", notice)],
        f,
        now,
        page,
        link,
    );
    // Scores, in the order the matches were given (the page is a slice of them).
    let scores = matches.iter().skip(page.offset).map(|(_, score)| *score);
    if let Some(entries) = bundle.get_mut("entry").and_then(Value::as_array_mut) {
        for (entry, score) in entries
            .iter_mut()
            .filter(|e| e["search"]["mode"] == "match")
            .zip(scores)
        {
            entry["search"]["score"] = json!(score);
        }
    }
    bundle
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
) -> Vec<OperationOutcome> {
    let mut notes = Vec::new();
    match section {
        Section::NotAvailable => notes.push(outcome(
            "warning",
            "incomplete",
            &format!("{what}: information not available from the source"),
        )),
        Section::NoneRecorded => notes.push(outcome(
            "information",
            "informational",
            &format!("{what}: none recorded at the source"),
        )),
        Section::WithheldByPatient => {
            notes.push(outcome("warning", "suppressed", &withheld_by_patient(what)))
        }
        Section::Entries(_) => {}
    }
    if let Some(words) = could_not_show(unreadable, noun) {
        notes.push(outcome("warning", "incomplete", &words));
    }
    if withheld > 0 {
        notes.push(outcome("warning", "suppressed", WITHHELD_WARNING));
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
                .map(|a| Resource::Flag(write::flag(&id, a)))
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
                .map(|a| Resource::AllergyIntolerance(write::allergy(&id, a)))
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
                .map(|m| Resource::MedicationStatement(write::medication(&id, m)))
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
) -> CompositionSection {
    let code = Coding::new(LOINC, loinc.0).display(loinc.1);
    let with_note = |text: String| match &not_shown {
        Some(n) => format!("{text} {n}."),
        None => text,
    };
    match section {
        Some(Section::Entries(_)) => {
            document::section(title, code, &with_note(summary.to_owned()), refs, None)
        }
        // The source holds nothing: "nil known", which the narrative says is not a
        // clinical statement that the patient has none.
        Some(Section::NoneRecorded) => document::section(
            title,
            code,
            &with_note(format!(
                "{title}: none recorded at the source. This is not a statement that the patient has none."
            )),
            Vec::new(),
            Some(EmptyReason::NilKnown),
        ),
        Some(Section::NotAvailable) => document::section(
            title,
            code,
            &with_note(format!(
                "{title}: information not available from the source."
            )),
            Vec::new(),
            Some(EmptyReason::Unavailable),
        ),
        Some(Section::WithheldByPatient) => document::section(
            title,
            code,
            &format!("{}.", withheld_by_patient(title)),
            Vec::new(),
            Some(EmptyReason::Withheld),
        ),
        None => document::section(
            title,
            code,
            &format!("{title}: not part of your view of this record."),
            Vec::new(),
            Some(EmptyReason::Withheld),
        ),
    }
}

/// `GET /fhir/Patient/{id}/$summary`: a document Bundle whose Composition lists alerts
/// first, then allergies, then medications. Every section reference is the `fullUrl` of
/// an entry in the same Bundle.
pub fn summary(
    s: &Shown,
    f: &Freshness,
    now: Timestamp,
    device_label: &str,
    request_id: u64,
) -> Value {
    let id = s.nhs_number.digits();
    let patient = patient_resource(s, f);
    let patient_url = document::full_url(&patient);
    let mut resources: Vec<Resource> = vec![patient];
    // Each item's entry and its reference from the section: the same `fullUrl`.
    let mut add = |r: Resource, refs: &mut Vec<String>| {
        refs.push(document::full_url(&r));
        resources.push(r);
    };
    let mut alert_refs = Vec::new();
    let mut alert_lines = Vec::new();
    for a in alerts_by_severity(s) {
        add(Resource::Flag(write::flag(&id, a)), &mut alert_refs);
        alert_lines.push(format!("{}{}", severity_word(a.severity), alert_text(a)));
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
                add(
                    Resource::AllergyIntolerance(write::allergy(&id, a)),
                    &mut refs,
                );
                lines.push(allergy_text(a));
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
                add(
                    Resource::MedicationStatement(write::medication(&id, m)),
                    &mut refs,
                );
                lines.push(medication_text(m));
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
        sections.push(CompositionSection {
            title: "Withheld items".into(),
            code: model::CodeableConcept::coded(
                Coding::new(SECTION_SYSTEM, "withheld-items")
                    .display("Items withheld for confidentiality"),
            ),
            text: Some(narrative(WITHHELD_WARNING)),
            entry: Vec::new(),
            empty_reason: Some(EmptyReason::Withheld.concept()),
        });
    }
    let mut composition = Resource::Composition(Composition {
        id: format!("summary-{id}-{request_id}"),
        meta: None,
        status: "final".into(),
        kind: model::CodeableConcept::coded(
            Coding::new(LOINC, "60591-5").display("Patient summary Document"),
        ),
        subject: Reference {
            reference: Some(patient_url),
            display: Some(s.nhs_number.to_string()),
            ..Reference::default()
        },
        date: instant(now),
        author: vec![Reference::display(format!("carecache ({device_label})"))],
        title: "Patient summary (alerts, allergies, medications)".into(),
        confidentiality: if s.demographics.restricted { "R" } else { "N" }.into(),
        section: sections,
    });
    tag(&mut composition, f);
    let mut b = Resource::Bundle(Box::new(document::document(
        &format!("{id}-{request_id}"),
        instant(now),
        composition,
        resources,
    )));
    tag(&mut b, f);
    b.to_json()
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
        Some(v) => t.push_str(&format!(" ({})", v.code())),
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
    let profile = codes::uk_core;
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
                    "profile": profile("UKCore-Patient"),
                    "interaction": [{ "code": "read" }, { "code": "search-type" }],
                    "searchParam": [
                        { "name": "identifier", "type": "token", "documentation": format!("{}|{{NHS number}}", codes::NHS_NUMBER_SYSTEM) },
                        { "name": "family", "type": "string", "documentation": "Family name; tolerant of case, accents, apostrophes, hyphens, Mac/Mc and misspelling. A demographic search needs at least two of name, birthdate and address-postalcode; matches carry search.score" },
                        { "name": "given", "type": "string", "documentation": "Given name, compared as family" },
                        { "name": "birthdate", "type": "date", "documentation": "YYYY-MM-DD (DD/MM/YYYY accepted); day and month swapped also match" },
                        { "name": "gender", "type": "token", "documentation": "male | female | other | unknown; a difference lowers the score" },
                        { "name": "address-postalcode", "type": "string", "documentation": "Full postcode or its district; matched by district" },
                    ],
                    "operation": [{ "name": "summary", "definition": "http://hl7.org/fhir/uv/ips/OperationDefinition/summary" }],
                },
                { "type": "Flag", "profile": profile("UKCore-Flag"), "interaction": [{ "code": "search-type" }], "searchParam": search_patient },
                { "type": "AllergyIntolerance", "profile": profile("UKCore-AllergyIntolerance"), "interaction": [{ "code": "search-type" }], "searchParam": search_patient },
                { "type": "MedicationStatement", "profile": profile("UKCore-MedicationStatement"), "interaction": [{ "code": "search-type" }], "searchParam": search_patient },
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
        "verification": a.verification.map(FhirCode::code),
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
        "dosage": m.dosage.as_ref().map(|d| json!({
            "dose": d.dose.as_ref().map(|q| json!({
                "value": q.value.as_f64(),
                "unit": q.unit.as_ref().map(|u| u.as_str()),
            })),
            "frequency": d.frequency,
            "period": d.period.as_ref().map(sync_protocol::types::Decimal::as_f64),
            "period_unit": d.period_unit.map(FhirCode::code),
            "route": d.route.as_ref().map(|r| r.display.as_str()),
            "as_needed": d.as_needed,
        })),
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
/// One match of a demographic search: the caseload row, how well it matched (0–1), why,
/// and whether it is shown under emergency access.
pub fn json_search_item(s: &Shown, score: f64, reasons: &[&str]) -> Value {
    let mut row = json_list_item(s);
    row["score"] = json!(score);
    row["match"] = json!(reasons);
    row["emergency_access"] = json!(s.grant.emergency());
    row
}

/// One row of the caseload list.
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
