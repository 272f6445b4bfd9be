//! FHIR R4 in: the upstream's resources mapped into the internal model, one patient at a
//! time, with the sharing rules applied on the way (`sharing`).
//!
//! A resource the mapping cannot read is reported and skipped whole — never half-mapped.
//! Because a silently shorter allergy or medication list would look complete to a
//! clinician, a section that lost an unreadable item is served as "not available", not
//! as the items that happened to map. Reports carry the resource type, its FHIR id and
//! the rule it broke; never patient data.

use std::collections::BTreeMap;

use serde_json::Value;
use sync_protocol::NhsNumber;
use sync_protocol::message::ObjectionStatus;
use sync_protocol::record::{
    Alert, AlertCategory, AlertSeverity, Allergy, AllergyCategory, AllergyStatus, ContactRole,
    Course, Criticality, Demographics, HumanName, KeyContact, Medication, MedicationStatus,
    PatientRecord, Period, Reaction, ReactionSeverity, Section, Sex,
};
use sync_protocol::types::{
    BoundedVec, Coding, Date, OdsCode, PostcodeDistrict, Provenance, RecordVersion, SctId,
    SourceId, Text, Timestamp,
};

use crate::sharing::SharingRules;

const NHS_NUMBER_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhs-number";
const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
const SNOMED: &str = "http://snomed.info/sct";
const CONFIDENTIALITY: &str = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality";
const ALLERGY_LIST_CODE: &str = "886921000000105";

/// Why a resource could not be mapped. Names a rule, never a value.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct MappingIssue {
    /// FHIR resource type.
    pub resource_type: String,
    /// FHIR id (not patient data: our ids are opaque).
    pub id: String,
    /// The rule it broke.
    pub reason: &'static str,
}

impl std::fmt::Display for MappingIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}: {}", self.resource_type, self.id, self.reason)
    }
}

/// A patient's objection as the source states it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SourceObjection {
    /// Objected or withdrawn.
    pub status: ObjectionStatus,
    /// When it was recorded.
    pub recorded_at: Timestamp,
}

/// One patient mapped: the record a device may hold (version 0 until the hub stores it)
/// and the objection, if any.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Mapped {
    /// The record, after the sharing rules.
    pub record: PatientRecord,
    /// The latest objection the source holds.
    pub objection: Option<SourceObjection>,
}

/// All resources of one patient, as collected from the source.
#[derive(Clone, Default, Debug)]
pub struct PatientResources {
    /// The Patient resource.
    pub patient: Option<Value>,
    /// Flag, AllergyIntolerance, MedicationStatement, RelatedPerson, List, Consent,
    /// already mapped.
    pub items: Vec<Item>,
}

/// Group resources by the patient they belong to: the Patient's own id, or the id in
/// `subject` / `patient` (`Patient/{id}`). Resources of other types, or that name no
/// patient, are reported.
#[derive(Debug)]
pub struct Collector<'a> {
    /// Resources per patient FHIR id.
    pub patients: BTreeMap<String, PatientResources>,
    /// What could not be placed.
    pub issues: Vec<MappingIssue>,
    rules: &'a SharingRules,
}

impl<'a> Collector<'a> {
    /// An empty collector applying `rules`.
    pub fn new(rules: &'a SharingRules) -> Self {
        Self {
            patients: BTreeMap::new(),
            issues: Vec::new(),
            rules,
        }
    }

    /// Add one resource.
    pub fn add(&mut self, resource: Value) {
        let kind = str_at(&resource, &["resourceType"])
            .unwrap_or("")
            .to_owned();
        let id = str_at(&resource, &["id"]).unwrap_or("").to_owned();
        let issue = |reason| MappingIssue {
            resource_type: kind.clone(),
            id: id.clone(),
            reason,
        };
        match kind.as_str() {
            "Patient" if !id.is_empty() => {
                self.patients.entry(id.clone()).or_default().patient = Some(resource);
            }
            "Patient" => self.issues.push(issue("Patient without an id")),
            "Flag"
            | "AllergyIntolerance"
            | "MedicationStatement"
            | "RelatedPerson"
            | "List"
            | "Consent" => {
                let reference = str_at(&resource, &["subject", "reference"])
                    .or_else(|| str_at(&resource, &["patient", "reference"]));
                match reference.and_then(|r| r.strip_prefix("Patient/")) {
                    Some(pid) if !pid.is_empty() => {
                        let item = classify(&resource, self.rules);
                        self.patients
                            .entry(pid.to_owned())
                            .or_default()
                            .items
                            .push(item);
                    }
                    _ => self.issues.push(issue("no Patient reference")),
                }
            }
            _ => self.issues.push(issue("resource type not used")),
        }
    }
}

/// One non-Patient resource, mapped as soon as it is read so that the source's JSON is
/// not kept in memory while the rest of the export is read.
#[derive(Clone, Debug)]
pub enum Item {
    /// A Flag.
    Alert(Result<Option<Alert>, MappingIssue>),
    /// An AllergyIntolerance.
    Allergy(Result<Option<Allergy>, MappingIssue>),
    /// A MedicationStatement.
    Medication(Result<Option<Medication>, MappingIssue>),
    /// A RelatedPerson.
    Contact(Result<Option<KeyContact>, MappingIssue>),
    /// The source says it cannot provide allergies.
    AllergiesUnavailable,
    /// A Consent (an objection, or one that does not restrict sharing).
    Objection(Result<Option<SourceObjection>, MappingIssue>),
    /// Withheld by the sharing rules: only counted.
    Withheld,
    /// Read but not used (e.g. another kind of List).
    Ignored,
}

/// Map one item resource, applying the sharing rules first.
pub fn classify(item: &Value, rules: &SharingRules) -> Item {
    let kind = str_at(item, &["resourceType"]).unwrap_or("");
    let id = str_at(item, &["id"]).unwrap_or("");
    let issue = |reason| MappingIssue {
        resource_type: kind.to_owned(),
        id: id.to_owned(),
        reason,
    };
    if matches!(kind, "Flag" | "AllergyIntolerance" | "MedicationStatement")
        && !entered_in_error(item)
        && rules.withholds(item)
    {
        return Item::Withheld;
    }
    match kind {
        "Flag" => Item::Alert(flag(item).map_err(issue)),
        "AllergyIntolerance" => Item::Allergy(allergy(item).map_err(issue)),
        "MedicationStatement" => Item::Medication(medication(item).map_err(issue)),
        "RelatedPerson" => Item::Contact(related_person(item).map_err(issue)),
        "List" => {
            if coding_code(item.get("code"), SNOMED) == Some(ALLERGY_LIST_CODE)
                && item.get("emptyReason").is_some()
            {
                Item::AllergiesUnavailable
            } else {
                Item::Ignored
            }
        }
        "Consent" => Item::Objection(consent(item).map_err(issue)),
        _ => Item::Ignored,
    }
}

/// Map one patient. `Err` when the Patient itself cannot be read (the whole patient is
/// skipped); item problems are pushed to `issues` and the rest is mapped.
pub fn map_patient(
    fhir_id: &str,
    resources: PatientResources,
    issues: &mut Vec<MappingIssue>,
) -> Result<Mapped, MappingIssue> {
    let patient_issue = |reason| MappingIssue {
        resource_type: "Patient".into(),
        id: fhir_id.to_owned(),
        reason,
    };
    let patient = resources
        .patient
        .ok_or_else(|| patient_issue("resources for a Patient the source did not send"))?;
    let (nhs_number, demographics) = demographics(&patient).map_err(patient_issue)?;

    let mut alerts = SectionBuilder::default();
    let mut allergies = SectionBuilder::default();
    let mut medications = SectionBuilder::default();
    let mut contacts = SectionBuilder::default();
    let mut allergies_unavailable = false;
    let mut objection: Option<SourceObjection> = None;
    let mut withheld: u16 = 0;

    for item in resources.items {
        match item {
            Item::Alert(r) => alerts.push(r, issues),
            Item::Allergy(r) => allergies.push(r, issues),
            Item::Medication(r) => medications.push(r, issues),
            Item::Contact(r) => contacts.push(r, issues),
            Item::AllergiesUnavailable => allergies_unavailable = true,
            Item::Objection(Ok(Some(o))) => {
                if objection.is_none_or(|prev| prev.recorded_at <= o.recorded_at) {
                    objection = Some(o);
                }
            }
            Item::Objection(Ok(None)) | Item::Ignored => {}
            Item::Objection(Err(issue)) => issues.push(issue),
            Item::Withheld => withheld = withheld.saturating_add(1),
        }
    }

    let record = PatientRecord {
        nhs_number,
        version: RecordVersion(0),
        demographics,
        alerts: alerts.finish(false),
        allergies: allergies.finish(allergies_unavailable),
        medications: medications.finish(false),
        contacts: contacts.finish(false),
        withheld,
    };
    Ok(Mapped { record, objection })
}

/// Items of one section; `Ok(None)` from a mapper means "not shared, not an error"
/// (entered in error, inactive).
struct SectionBuilder<T> {
    items: Vec<(String, T)>,
    broken: bool,
}

impl<T> Default for SectionBuilder<T> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            broken: false,
        }
    }
}

impl<T: HasSourceId> SectionBuilder<T> {
    fn push(&mut self, mapped: Result<Option<T>, MappingIssue>, issues: &mut Vec<MappingIssue>) {
        match mapped {
            Ok(Some(item)) => self.items.push((item.source_id().to_owned(), item)),
            Ok(None) => {}
            Err(issue) => {
                issues.push(issue);
                self.broken = true;
            }
        }
    }

    /// Items sorted by source id (the source's order is not meaningful); "not available"
    /// if anything could not be read, or the list is over its limit, or the source said
    /// so.
    fn finish<const N: usize>(mut self, unavailable: bool) -> Section<T, N> {
        if self.broken || self.items.len() > N {
            return Section::NotAvailable;
        }
        self.items.sort_by(|a, b| a.0.cmp(&b.0));
        let items: Vec<T> = self.items.into_iter().map(|(_, t)| t).collect();
        if items.is_empty() {
            return if unavailable {
                Section::NotAvailable
            } else {
                Section::NoneRecorded
            };
        }
        Section::from_items(items).unwrap_or(Section::NotAvailable)
    }
}

trait HasSourceId {
    fn source_id(&self) -> &str;
}
impl HasSourceId for Alert {
    fn source_id(&self) -> &str {
        self.source_id.as_str()
    }
}
impl HasSourceId for Allergy {
    fn source_id(&self) -> &str {
        self.source_id.as_str()
    }
}
impl HasSourceId for Medication {
    fn source_id(&self) -> &str {
        self.source_id.as_str()
    }
}
impl HasSourceId for KeyContact {
    fn source_id(&self) -> &str {
        // Contacts have no source id on the wire; order by name then.
        self.name.as_str()
    }
}

// ---- field helpers -------------------------------------------------------------------

/// The string at a path of object keys.
pub(crate) fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for key in path {
        cur = cur.get(key)?;
    }
    cur.as_str()
}

/// The code of the first coding with `system` in a CodeableConcept.
fn coding_code<'a>(concept: Option<&'a Value>, system: &str) -> Option<&'a str> {
    concept?
        .get("coding")?
        .as_array()?
        .iter()
        .find(|c| c.get("system").and_then(Value::as_str) == Some(system))?
        .get("code")?
        .as_str()
}

/// The SNOMED coding of a CodeableConcept, with its display (or the concept's text).
fn snomed(concept: Option<&Value>) -> Result<Coding, &'static str> {
    let concept = concept.ok_or("no code")?;
    let coding = concept
        .get("coding")
        .and_then(Value::as_array)
        .and_then(|cs| {
            cs.iter()
                .find(|c| c.get("system").and_then(Value::as_str) == Some(SNOMED))
        })
        .ok_or("no SNOMED CT coding")?;
    let code: u64 = coding
        .get("code")
        .and_then(Value::as_str)
        .and_then(|c| c.parse().ok())
        .ok_or("SNOMED CT code is not a number")?;
    let code = SctId::new(code).map_err(|_| "SNOMED CT code fails its check digit")?;
    let display = coding
        .get("display")
        .and_then(Value::as_str)
        .or_else(|| concept.get("text").and_then(Value::as_str))
        .ok_or("coding without display text")?;
    Ok(Coding {
        code,
        display: Text::new(display).map_err(|_| "display text too long or not printable")?,
    })
}

/// Every SNOMED code a resource carries in the places the sharing rules look.
pub(crate) fn snomed_codes(v: &Value) -> Vec<u64> {
    let mut out = Vec::new();
    let mut collect = |concept: Option<&Value>| {
        if let Some(cs) = concept
            .and_then(|c| c.get("coding"))
            .and_then(Value::as_array)
        {
            for c in cs {
                if c.get("system").and_then(Value::as_str) == Some(SNOMED)
                    && let Some(code) = c
                        .get("code")
                        .and_then(Value::as_str)
                        .and_then(|s| s.parse().ok())
                {
                    out.push(code);
                }
            }
        }
    };
    collect(v.get("code"));
    collect(v.get("medicationCodeableConcept"));
    for key in ["reasonCode", "category"] {
        if let Some(list) = v.get(key).and_then(Value::as_array) {
            for c in list {
                collect(Some(c));
            }
        }
    }
    if let Some(reactions) = v.get("reaction").and_then(Value::as_array) {
        for r in reactions {
            if let Some(ms) = r.get("manifestation").and_then(Value::as_array) {
                for m in ms {
                    collect(Some(m));
                }
            }
        }
    }
    out
}

fn text<const N: usize>(s: &str, what: &'static str) -> Result<Text<N>, &'static str> {
    Text::new(s).map_err(|_| what)
}

/// A FHIR date or dateTime to a (possibly partial) date: `1990`, `1990-05`,
/// `1990-05-12`, `1990-05-12T…`.
pub(crate) fn date(s: &str) -> Result<Date, &'static str> {
    let day_part = s.split('T').next().unwrap_or(s);
    let mut parts = day_part.split('-');
    let num = |p: Option<&str>, len: usize| -> Result<Option<u16>, &'static str> {
        match p {
            None => Ok(None),
            Some(p) if p.len() == len && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse().map(Some).map_err(|_| "bad date")
            }
            Some(_) => Err("bad date"),
        }
    };
    let y = num(parts.next(), 4)?.ok_or("bad date")?;
    let m = num(parts.next(), 2)?;
    let d = num(parts.next(), 2)?;
    if parts.next().is_some() {
        return Err("bad date");
    }
    let narrow = |v: u16| u8::try_from(v).map_err(|_| "bad date");
    match (m, d) {
        (None, _) => Date::year_only(y),
        (Some(m), None) => Date::ym(y, narrow(m)?),
        (Some(m), Some(d)) => Date::ymd(y, narrow(m)?, narrow(d)?),
    }
    .map_err(|_| "date out of range")
}

/// An RFC 3339 instant to a timestamp.
pub(crate) fn instant(s: &str) -> Result<Timestamp, &'static str> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|_| "bad instant")?;
    let ms = t.unix_timestamp_nanos() / 1_000_000;
    u64::try_from(ms)
        .ok()
        .and_then(|ms| Timestamp::from_millis(ms).ok())
        .ok_or("instant out of range")
}

/// Item provenance: organisation from `meta.source` (`ODS_SYSTEM|code`) or the
/// author/informationSource/recorder identifier; time from `meta.lastUpdated`.
fn provenance(v: &Value) -> Result<Provenance, &'static str> {
    let org = str_at(v, &["meta", "source"])
        .and_then(|s| s.strip_prefix(ODS_SYSTEM))
        .and_then(|s| s.strip_prefix('|'))
        .or_else(|| {
            ["author", "informationSource", "recorder"]
                .iter()
                .find_map(|k| str_at(v, &[k, "identifier", "value"]))
        })
        .ok_or("no source organisation")?;
    let at = str_at(v, &["meta", "lastUpdated"]).ok_or("no meta.lastUpdated")?;
    Ok(Provenance {
        organisation: OdsCode::new(org).map_err(|_| "source organisation is not an ODS code")?,
        last_updated: instant(at)?,
    })
}

fn source_id(v: &Value) -> Result<SourceId, &'static str> {
    SourceId::new(str_at(v, &["id"]).ok_or("no id")?).map_err(|_| "id is not a FHIR id")
}

pub(crate) fn entered_in_error(v: &Value) -> bool {
    str_at(v, &["status"]) == Some("entered-in-error")
        || coding_code(
            v.get("verificationStatus"),
            "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification",
        ) == Some("entered-in-error")
}

// ---- resources -----------------------------------------------------------------------

fn demographics(p: &Value) -> Result<(NhsNumber, Demographics), &'static str> {
    let nhs = p
        .get("identifier")
        .and_then(Value::as_array)
        .and_then(|ids| {
            ids.iter()
                .find(|i| i.get("system").and_then(Value::as_str) == Some(NHS_NUMBER_SYSTEM))
        })
        .and_then(|i| i.get("value"))
        .and_then(Value::as_str)
        .ok_or("no NHS number identifier")?;
    let nhs = NhsNumber::parse(nhs).map_err(|_| "NHS number fails Modulus 11")?;
    let labels = security_codes(p, CONFIDENTIALITY);
    if labels.contains(&"REDACTED") {
        return Err("record redacted upstream");
    }
    let restricted = labels.iter().any(|c| matches!(*c, "R" | "V"));
    let names = p.get("name").and_then(Value::as_array).ok_or("no name")?;
    let name = names
        .iter()
        .find(|n| n.get("use").and_then(Value::as_str) == Some("official"))
        .or_else(|| names.first())
        .ok_or("no name")?;
    let joined = |key: &str| -> String {
        name.get(key)
            .and_then(Value::as_array)
            .map(|parts| {
                parts
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default()
    };
    let family = name.get("family").and_then(Value::as_str).unwrap_or("");
    let given = joined("given");
    if family.is_empty() && given.is_empty() {
        return Err("name without family or given parts");
    }
    let prefix = joined("prefix");
    let name = HumanName {
        family: text(family, "family name too long")?,
        given: text(&given, "given names too long")?,
        prefix: if prefix.is_empty() {
            None
        } else {
            Some(text(&prefix, "name prefix too long")?)
        },
    };
    let birth_date = date(str_at(p, &["birthDate"]).ok_or("no birthDate")?)?;
    let sex = match str_at(p, &["gender"]) {
        Some("male") => Sex::Male,
        Some("female") => Sex::Female,
        Some("other") => Sex::Other,
        Some("unknown") | None => Sex::Unknown,
        Some(_) => return Err("gender not in the R4 value set"),
    };
    let (postcode, gp) = if restricted {
        (None, None)
    } else {
        let postcode = p
            .get("address")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(|a| a.get("postalCode"))
            .and_then(Value::as_str)
            .and_then(|pc| pc.split_whitespace().next())
            .map(|district| PostcodeDistrict::new(district.to_ascii_uppercase()))
            .transpose()
            .map_err(|_| "postcode district malformed")?;
        let gp = p
            .get("generalPractitioner")
            .and_then(Value::as_array)
            .and_then(|g| {
                g.iter()
                    .find(|r| str_at(r, &["identifier", "system"]) == Some(ODS_SYSTEM))
            })
            .and_then(|r| str_at(r, &["identifier", "value"]))
            .map(OdsCode::new)
            .transpose()
            .map_err(|_| "GP practice is not an ODS code")?;
        (postcode, gp)
    };
    let d = Demographics::new(name, birth_date, sex, postcode, gp, restricted)
        .map_err(|_| "demographics inconsistent")?;
    Ok((nhs, d))
}

/// The codes of `meta.security` entries with `system`.
pub(crate) fn security_codes<'a>(v: &'a Value, system: &str) -> Vec<&'a str> {
    v.get("meta")
        .and_then(|m| m.get("security"))
        .and_then(Value::as_array)
        .map(|labels| {
            labels
                .iter()
                .filter(|l| l.get("system").and_then(Value::as_str) == Some(system))
                .filter_map(|l| l.get("code").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default()
}

fn flag(v: &Value) -> Result<Option<Alert>, &'static str> {
    match str_at(v, &["status"]) {
        Some("active") => {}
        Some("inactive" | "entered-in-error") => return Ok(None),
        _ => return Err("Flag status missing or not in the R4 value set"),
    }
    let code = snomed(v.get("code"))?;
    let category_text = v
        .get("category")
        .and_then(Value::as_array)
        .and_then(|c| c.first());
    let category = match category_text
        .and_then(|c| c.get("text"))
        .and_then(Value::as_str)
    {
        Some("communication need") => AlertCategory::CommunicationNeed,
        Some("reasonable adjustment") => AlertCategory::ReasonableAdjustment,
        Some("clinical warning") => AlertCategory::ClinicalWarning,
        Some("treatment restriction") => AlertCategory::TreatmentRestriction,
        Some("safeguarding") => AlertCategory::Safeguarding,
        Some("end of life") => AlertCategory::EndOfLife,
        _ => match coding_code(
            category_text,
            "http://terminology.hl7.org/CodeSystem/flag-category",
        ) {
            Some("contact") => AlertCategory::CommunicationNeed,
            Some("clinical" | "drug" | "diet" | "lab") => AlertCategory::ClinicalWarning,
            Some("advance-directive") => AlertCategory::EndOfLife,
            Some("safety" | "behavioral") => AlertCategory::Safeguarding,
            _ => AlertCategory::Other,
        },
    };
    let priority = v
        .get("extension")
        .and_then(Value::as_array)
        .and_then(|exts| {
            exts.iter().find(|e| {
                e.get("url").and_then(Value::as_str)
                    == Some("http://hl7.org/fhir/StructureDefinition/flag-priority")
            })
        })
        .and_then(|e| {
            coding_code(
                e.get("valueCodeableConcept"),
                "http://hl7.org/fhir/flag-priority-code",
            )
        });
    // An alert with no stated priority is shown as a warning, never as mere information.
    let severity = match priority {
        Some("PH") => AlertSeverity::HighRisk,
        Some("PN" | "PL") => AlertSeverity::Information,
        _ => AlertSeverity::Warning,
    };
    let detail = str_at(v, &["code", "text"])
        .filter(|t| *t != code.display.as_str())
        .map(|t| text(t, "alert detail too long"))
        .transpose()?;
    let period = Period::new(
        str_at(v, &["period", "start"]).map(date).transpose()?,
        str_at(v, &["period", "end"]).map(date).transpose()?,
    )
    .map_err(|_| "period ends before it starts")?;
    Ok(Some(Alert {
        source_id: source_id(v)?,
        category,
        code,
        detail,
        period,
        severity,
        provenance: provenance(v)?,
    }))
}

fn allergy(v: &Value) -> Result<Option<Allergy>, &'static str> {
    const VERIFICATION: &str =
        "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification";
    const CLINICAL: &str = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical";
    if matches!(
        coding_code(v.get("verificationStatus"), VERIFICATION),
        Some("entered-in-error" | "refuted")
    ) {
        return Ok(None);
    }
    let status = match coding_code(v.get("clinicalStatus"), CLINICAL) {
        Some("active") => AllergyStatus::Active,
        Some("inactive") => AllergyStatus::Inactive,
        Some("resolved") => AllergyStatus::Resolved,
        _ => return Err("clinicalStatus missing or not in the R4 value set"),
    };
    let category = match v
        .get("category")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
        .and_then(Value::as_str)
    {
        None => None,
        Some("food") => Some(AllergyCategory::Food),
        Some("medication") => Some(AllergyCategory::Medication),
        Some("environment") => Some(AllergyCategory::Environment),
        Some("biologic") => Some(AllergyCategory::Biologic),
        Some(_) => return Err("category not in the R4 value set"),
    };
    let criticality = match str_at(v, &["criticality"]) {
        None => None,
        Some("low") => Some(Criticality::Low),
        Some("high") => Some(Criticality::High),
        Some("unable-to-assess") => Some(Criticality::UnableToAssess),
        Some(_) => return Err("criticality not in the R4 value set"),
    };
    let mut reactions = Vec::new();
    for r in v
        .get("reaction")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let first = r
            .get("manifestation")
            .and_then(Value::as_array)
            .and_then(|m| m.first());
        let null_flavour =
            coding_code(first, "http://terminology.hl7.org/CodeSystem/v3-NullFlavor").is_some();
        let manifestation = match first {
            Some(m) if !null_flavour => Some(snomed(Some(m))?),
            _ => None,
        };
        let severity = match str_at(r, &["severity"]) {
            None => None,
            Some("mild") => Some(ReactionSeverity::Mild),
            Some("moderate") => Some(ReactionSeverity::Moderate),
            Some("severe") => Some(ReactionSeverity::Severe),
            Some(_) => return Err("reaction severity not in the R4 value set"),
        };
        reactions.push(Reaction {
            manifestation,
            description: str_at(r, &["description"])
                .map(|d| text(d, "reaction description too long"))
                .transpose()?,
            severity,
        });
    }
    let note = v
        .get("note")
        .and_then(Value::as_array)
        .map(|notes| {
            notes
                .iter()
                .filter_map(|n| n.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .filter(|n| !n.is_empty());
    Ok(Some(Allergy {
        source_id: source_id(v)?,
        substance: snomed(v.get("code"))?,
        category,
        criticality,
        status,
        reactions: BoundedVec::try_from(reactions).map_err(|_| "more than 8 reactions")?,
        onset: str_at(v, &["onsetDateTime"]).map(date).transpose()?,
        note: note.map(|n| text(&n, "note too long")).transpose()?,
        provenance: provenance(v)?,
    }))
}

fn extension<'a>(v: &'a Value, url: &str) -> Option<&'a Value> {
    v.get("extension")?
        .as_array()?
        .iter()
        .find(|e| e.get("url").and_then(Value::as_str) == Some(url))
}

fn medication(v: &Value) -> Result<Option<Medication>, &'static str> {
    let status = match str_at(v, &["status"]) {
        Some("active") => MedicationStatus::Active,
        Some("completed") => MedicationStatus::Completed,
        Some("stopped") => MedicationStatus::Stopped,
        Some("on-hold") => MedicationStatus::OnHold,
        Some("intended") => MedicationStatus::Intended,
        Some("unknown") => MedicationStatus::Unknown,
        Some("entered-in-error" | "not-taken") => return Ok(None),
        _ => return Err("status missing or not in the R4 value set"),
    };
    let course_text = str_at(v, &["category", "text"]);
    let course = match (
        coding_code(
            v.get("category"),
            "https://fhir.hl7.org.uk/CodeSystem/UKCore-MedicationRequestCourseOfTherapy",
        ),
        course_text,
    ) {
        (Some("acute"), _) | (None, Some("acute")) => Some(Course::Acute),
        (Some("continuous"), _) | (None, Some("repeat")) => Some(Course::Repeat),
        (Some("continuous-repeating-dispensing"), _) | (None, Some("repeat dispensing")) => {
            Some(Course::RepeatDispensing)
        }
        _ => None,
    };
    let started = str_at(v, &["effectivePeriod", "start"])
        .or_else(|| str_at(v, &["effectiveDateTime"]))
        .map(date)
        .transpose()?;
    let last_issued = extension(
        v,
        "https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-MedicationStatementLastIssueDate",
    )
    .and_then(|e| e.get("valueDateTime"))
    .and_then(Value::as_str)
    .map(date)
    .transpose()?;
    let prescribed_elsewhere = extension(
        v,
        "https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-MedicationPrescribingOrganizationType",
    )
    .and_then(|e| str_at(e, &["valueCoding", "code"]))
        == Some("prescribed-by-another-organisation");
    let dose_text = v
        .get("dosage")
        .and_then(Value::as_array)
        .and_then(|d| d.first())
        .and_then(|d| d.get("text"))
        .and_then(Value::as_str)
        .map(|t| text(t, "dose text too long"))
        .transpose()?;
    Ok(Some(Medication {
        source_id: source_id(v)?,
        medicine: snomed(v.get("medicationCodeableConcept"))?,
        dose_text,
        status,
        course,
        started,
        last_issued,
        prescribed_elsewhere,
        provenance: provenance(v)?,
    }))
}

fn related_person(v: &Value) -> Result<Option<KeyContact>, &'static str> {
    if v.get("active").and_then(Value::as_bool) == Some(false) {
        return Ok(None);
    }
    let relationship = v
        .get("relationship")
        .and_then(Value::as_array)
        .and_then(|r| r.first());
    let role = match (
        coding_code(
            relationship,
            "http://terminology.hl7.org/CodeSystem/v3-RoleCode",
        ),
        coding_code(
            relationship,
            "http://terminology.hl7.org/CodeSystem/v2-0131",
        ),
    ) {
        (Some("NOK"), _) | (_, Some("N")) => ContactRole::NextOfKin,
        (Some("POWATT"), _) => ContactRole::PowerOfAttorney,
        (_, Some("C")) => ContactRole::Carer,
        (_, Some("CP")) => ContactRole::KeyWorker,
        _ => ContactRole::Other,
    };
    let name = v
        .get("name")
        .and_then(Value::as_array)
        .and_then(|n| n.first())
        .ok_or("RelatedPerson without a name")?;
    let name = match name.get("text").and_then(Value::as_str) {
        Some(t) => t.to_owned(),
        None => {
            let given: Vec<&str> = name
                .get("given")
                .and_then(Value::as_array)
                .map(|g| g.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let family = name.get("family").and_then(Value::as_str).unwrap_or("");
            format!("{} {family}", given.join(" ")).trim().to_owned()
        }
    };
    if name.is_empty() {
        return Err("RelatedPerson without a name");
    }
    let phone = v
        .get("telecom")
        .and_then(Value::as_array)
        .and_then(|t| {
            t.iter()
                .find(|c| c.get("system").and_then(Value::as_str) == Some("phone"))
        })
        .and_then(|c| c.get("value"))
        .and_then(Value::as_str)
        .map(|p| text(p, "phone number too long"))
        .transpose()?;
    Ok(Some(KeyContact {
        role,
        name: text(&name, "contact name too long")?,
        relationship: relationship
            .and_then(|r| r.get("text"))
            .and_then(Value::as_str)
            .map(|t| text(t, "relationship too long"))
            .transpose()?,
        phone,
        provenance: provenance(v)?,
    }))
}

/// An objection: a patient-privacy Consent whose provision denies. `Ok(None)` for other
/// consents (they do not restrict sharing).
fn consent(v: &Value) -> Result<Option<SourceObjection>, &'static str> {
    let scope = coding_code(
        v.get("scope"),
        "http://terminology.hl7.org/CodeSystem/consentscope",
    );
    if scope != Some("patient-privacy") || str_at(v, &["provision", "type"]) != Some("deny") {
        return Ok(None);
    }
    let status = match str_at(v, &["status"]) {
        Some("active") => ObjectionStatus::Objected,
        Some("inactive" | "rejected") => ObjectionStatus::Withdrawn,
        Some("entered-in-error" | "draft" | "proposed") => return Ok(None),
        _ => return Err("Consent status missing or not in the R4 value set"),
    };
    let at = str_at(v, &["dateTime"])
        .or_else(|| str_at(v, &["meta", "lastUpdated"]))
        .ok_or("Consent without dateTime")?;
    Ok(Some(SourceObjection {
        status,
        recorded_at: instant(at)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_dates() {
        assert_eq!(date("1990").map(|d| d.to_string()), Ok("1990".into()));
        assert_eq!(date("1990-05").map(|d| d.to_string()), Ok("1990-05".into()));
        assert_eq!(
            date("1990-05-12T10:00:00Z").map(|d| d.to_string()),
            Ok("1990-05-12".into())
        );
        for bad in ["", "90", "1990-5", "1990-02-30", "1990-01-01-01", "abcd"] {
            assert!(date(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn instants_keep_milliseconds() {
        assert_eq!(
            instant("2024-01-02T03:04:05.678Z").map(Timestamp::as_millis),
            Ok(1_704_164_645_678)
        );
        assert!(instant("2024-01-02").is_err());
    }
}
