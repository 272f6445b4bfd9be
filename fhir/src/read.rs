//! FHIR in: a source's resources (typed, [`crate::model`]) to the protocol's record
//! items, one resource at a time. Used by the hub's ingest; the rules for what counts as
//! an objection and how sections are assembled live there (tools/hub/README.md, "FHIR
//! in" and "Objections").
//!
//! Each mapper returns `Ok(Some(item))`, `Ok(None)` when the resource is not shared and
//! is not an error (entered in error, inactive, refuted), or `Err(rule)` naming the rule
//! the resource broke — never a value from it.
//!
//! Clinical content is read as it was recorded: codes of any system (SNOMED CT, dm+d,
//! Read v2, CTV3, a local system) and text-only items, provenance without an ODS code,
//! partial dates.

use sync_protocol::NhsNumber;
use sync_protocol::record::{
    Alert, AlertSeverity, Allergy, AllergyCategory, AllergyStatus, AllergyVerification,
    Criticality, Demographics, HumanName, KeyContact, Medication, MedicationStatus, Period,
    Reaction, ReactionSeverity, Sex,
};
use sync_protocol::types::{
    BoundedVec, CTV3_SYSTEM, Code, Coding, DMD_SYSTEM, OdsCode, PostcodeDistrict, Provenance,
    READ_V2_SYSTEM, SNOMED_SYSTEM, SctId, SourceId, Text, Timestamp,
};

use crate::codes::{self, FhirCode};
use crate::dates::{date, instant, instant_range};
use crate::model;

/// The patient id a literal reference names (`Patient/{id}`, or an absolute URL ending
/// so), if any.
pub fn patient_id(r: &model::Reference) -> Option<&str> {
    let reference = r.reference.as_deref()?;
    let at = reference.rfind("Patient/")?;
    let id = reference.get(at + "Patient/".len()..)?;
    let id = id.split('/').next().unwrap_or(id);
    (!id.is_empty()).then_some(id)
}

/// The NHS number a logical reference names (`identifier` in the NHS number system).
pub fn nhs_reference(r: &model::Reference) -> Option<NhsNumber> {
    let id = r.identifier.as_ref()?;
    if id.system.as_deref() != Some(codes::NHS_NUMBER_SYSTEM) {
        return None;
    }
    NhsNumber::parse(id.value.as_deref()?).ok()
}

/// The NHS number on a Patient, if readable.
pub fn patient_nhs(p: &model::Patient) -> Option<NhsNumber> {
    p.identifier
        .iter()
        .find(|i| i.system.as_deref() == Some(codes::NHS_NUMBER_SYSTEM))
        .and_then(|i| i.value.as_deref())
        .and_then(|v| NhsNumber::parse(v).ok())
}

fn text<const N: usize>(s: &str, what: &'static str) -> Result<Text<N>, &'static str> {
    Text::new(s).map_err(|_| what)
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

fn source_id(id: Option<&String>) -> Result<SourceId, &'static str> {
    SourceId::new(id.ok_or("no id")?.as_str()).map_err(|_| "id is not a FHIR id")
}

fn security<'a>(meta: Option<&'a model::Meta>, system: &str) -> Vec<&'a str> {
    meta.map(|m| {
        m.security
            .iter()
            .filter(|c| c.system.as_deref() == Some(system))
            .filter_map(|c| c.code.as_deref())
            .collect()
    })
    .unwrap_or_default()
}

/// A CodeableConcept as it was recorded: the best coding it carries — SNOMED CT, then
/// dm+d, Read v2, CTV3, then any other system — with its display (or the concept's text),
/// or the concept's text alone. A coding that breaks its system's rule (a SNOMED CT or
/// dm+d code failing its check digit, an over-long code) is passed over for the next; the
/// concept is unreadable only when no coding and no text can be used.
pub fn concept(concept: Option<&model::CodeableConcept>) -> Result<Coding, &'static str> {
    let concept = concept.ok_or("no code")?;
    let concept_text = concept.text.as_deref().filter(|t| !t.trim().is_empty());
    let rank = |system: &str| match system {
        SNOMED_SYSTEM => 0,
        DMD_SYSTEM => 1,
        READ_V2_SYSTEM => 2,
        CTV3_SYSTEM => 3,
        _ => 4,
    };
    let mut candidates: Vec<(u8, Code, Option<&str>)> = concept
        .coding
        .iter()
        .filter_map(|c| {
            let system = c.system.as_deref()?;
            let value = c.code.as_deref()?.trim();
            let display = c.display.as_deref().filter(|d| !d.trim().is_empty());
            let sct = || value.parse::<u64>().ok().and_then(|n| SctId::new(n).ok());
            let code = match system {
                SNOMED_SYSTEM => Code::Snomed(sct()?),
                DMD_SYSTEM => Code::Dmd(sct()?),
                READ_V2_SYSTEM => Code::ReadV2(Text::new(value).ok()?),
                CTV3_SYSTEM => Code::Ctv3(Text::new(value).ok()?),
                _ if value.is_empty() => return None,
                _ => Code::Other {
                    system: Text::new(system).ok()?,
                    code: Text::new(value).ok()?,
                },
            };
            Some((rank(system), code, display))
        })
        .collect();
    candidates.sort_by_key(|(r, _, _)| *r);
    // The best coding that has words to show; a coding without a display borrows the
    // concept's text.
    for (_, code, display) in candidates {
        if let Some(display) = display.or(concept_text) {
            return Ok(Coding {
                code: Some(code),
                display: text(display, "display text too long or not printable")?,
            });
        }
    }
    match concept_text {
        Some(t) => Ok(Coding {
            code: None,
            display: text(t, "text too long or not printable")?,
        }),
        None => Err("neither a usable coding with display text nor text"),
    }
}

/// Item provenance, each part as the source gives it and none of them required:
/// - organisation: `meta.source` (`ODS_SYSTEM|code`), else the first of `who` identified
///   by an ODS code;
/// - recorded by: the first of `who` that names a person or a reference without an ODS
///   code — its display, else its reference (`Practitioner/…`), kept as given;
/// - last updated: `meta.lastUpdated` when it is a readable instant.
///
/// `who` are the resource's recorder, asserter, author, information source, in that
/// order.
pub fn provenance(
    meta: Option<&model::Meta>,
    who: &[Option<&model::Reference>],
) -> Result<Provenance, &'static str> {
    let ods_of = |r: &model::Reference| -> Option<OdsCode> {
        let id = r.identifier.as_ref()?;
        let system = id.system.as_deref();
        let is_org = system == Some(codes::ODS_SYSTEM)
            || (system.is_none() && r.kind.as_deref() == Some("Organization"));
        if is_org {
            OdsCode::new(id.value.as_deref()?.trim()).ok()
        } else {
            None
        }
    };
    let who = || who.iter().filter_map(|w| *w);
    let organisation = meta
        .and_then(|m| m.source.as_deref())
        .and_then(|s| s.strip_prefix(codes::ODS_SYSTEM))
        .and_then(|s| s.strip_prefix('|'))
        .and_then(|code| OdsCode::new(code.trim()).ok())
        .or_else(|| who().find_map(ods_of));
    let recorded_by = who()
        .filter(|r| ods_of(r).is_none())
        .find_map(|r| {
            r.display
                .as_deref()
                .or(r.reference.as_deref())
                .map(str::trim)
                .filter(|s| !s.is_empty())
        })
        .map(|by| Text::new(truncate(by, 256)))
        .transpose()
        .map_err(|_| "recorder name not printable")?;
    let last_updated = meta
        .and_then(|m| m.last_updated.as_deref())
        .and_then(|t| instant(t).ok());
    Ok(Provenance {
        organisation,
        recorded_by,
        last_updated,
    })
}

/// The Patient's NHS number and demographics. A restricted ("S-flagged", confidentiality
/// `R` or `V`) patient's location-revealing details are not read; one marked `REDACTED`
/// upstream is refused.
pub fn demographics(p: &model::Patient) -> Result<(NhsNumber, Demographics), &'static str> {
    let nhs = p
        .identifier
        .iter()
        .find(|i| i.system.as_deref() == Some(codes::NHS_NUMBER_SYSTEM))
        .and_then(|i| i.value.as_deref())
        .ok_or("no NHS number identifier")?;
    let nhs = NhsNumber::parse(nhs).map_err(|_| "NHS number fails Modulus 11")?;
    let labels = security(p.meta.as_ref(), codes::CONFIDENTIALITY);
    if labels.contains(&"REDACTED") {
        return Err("record redacted upstream");
    }
    let restricted = labels.iter().any(|c| matches!(*c, "R" | "V"));
    let name = p
        .name
        .iter()
        .find(|n| n.name_use.as_deref() == Some("official"))
        .or_else(|| p.name.first())
        .ok_or("no name")?;
    let family = name.family.as_deref().unwrap_or("");
    let given = name.given.join(" ");
    if family.is_empty() && given.is_empty() {
        return Err("name without family or given parts");
    }
    let prefix = name.prefix.join(" ");
    let name = HumanName {
        family: text(family, "family name too long")?,
        given: text(&given, "given names too long")?,
        prefix: if prefix.is_empty() {
            None
        } else {
            Some(text(&prefix, "name prefix too long")?)
        },
    };
    let birth_date = date(p.birth_date.as_deref().ok_or("no birthDate")?)?;
    let sex = match p.gender.as_deref() {
        None => Sex::Unknown,
        Some(g) => Sex::from_code(g).ok_or("gender not in the R4 value set")?,
    };
    let (postcode, gp) = if restricted {
        (None, None)
    } else {
        let postcode = p
            .address
            .first()
            .and_then(|a| a.postal_code.as_deref())
            .and_then(|pc| pc.split_whitespace().next())
            .map(|district| PostcodeDistrict::new(district.to_ascii_uppercase()))
            .transpose()
            .map_err(|_| "postcode district malformed")?;
        let gp = p
            .general_practitioner
            .iter()
            .filter_map(|r| r.identifier.as_ref())
            .find(|i| i.system.as_deref() == Some(codes::ODS_SYSTEM))
            .and_then(|i| i.value.as_deref())
            .map(OdsCode::new)
            .transpose()
            .map_err(|_| "GP practice is not an ODS code")?;
        (postcode, gp)
    };
    let d = Demographics::new(name, birth_date, sex, postcode, gp, restricted)
        .map_err(|_| "demographics inconsistent")?;
    Ok((nhs, d))
}

fn dates(
    start: Option<&str>,
    end: Option<&str>,
) -> Result<
    (
        Option<sync_protocol::types::Date>,
        Option<sync_protocol::types::Date>,
    ),
    &'static str,
> {
    Ok((start.map(date).transpose()?, end.map(date).transpose()?))
}

/// A Flag as an alert. The priority comes from the core `flag-priority` extension; an
/// alert with no stated (or an unknown) priority is shown as a warning, never as mere
/// information.
pub fn flag(v: &model::Flag) -> Result<Option<Alert>, &'static str> {
    match v.status.as_deref() {
        Some("active") => {}
        Some("inactive" | "entered-in-error") => return Ok(None),
        _ => return Err("Flag status missing or not in the R4 value set"),
    }
    let code = concept(v.code.as_ref())?;
    let category = v.category.first();
    let category = codes::alert_category_from(
        category.and_then(|c| c.text.as_deref()),
        category.and_then(|c| c.code_in(codes::FLAG_CATEGORY)),
    );
    let severity = model::extension(&v.extension, codes::FLAG_PRIORITY_EXTENSION)
        .and_then(|e| e.value_codeable_concept.as_ref())
        .and_then(|c| c.code_in(codes::FLAG_PRIORITY_SYSTEM))
        .and_then(AlertSeverity::from_code)
        .unwrap_or(AlertSeverity::Warning);
    // The concept's text is the detail, or (as carecache writes it) "display: detail".
    let detail = v
        .code
        .as_ref()
        .and_then(|c| c.text.as_deref())
        .map(|t| {
            t.strip_prefix(code.display.as_str())
                .and_then(|rest| rest.strip_prefix(": "))
                .unwrap_or(t)
        })
        .filter(|t| *t != code.display.as_str() && !t.trim().is_empty())
        .map(|t| text(t, "alert detail too long"))
        .transpose()?;
    let period = v.period.as_ref();
    let (start, end) = dates(
        period.and_then(|p| p.start.as_deref()),
        period.and_then(|p| p.end.as_deref()),
    )?;
    let period = Period::new(start, end).map_err(|_| "period ends before it starts")?;
    Ok(Some(Alert {
        source_id: source_id(v.id.as_ref())?,
        category,
        code,
        detail,
        period,
        severity,
        provenance: provenance(v.meta.as_ref(), &[v.author.as_ref()])?,
    }))
}

/// An AllergyIntolerance as an allergy. Verification is kept as stated — absent when the
/// source did not state it (shown as not stated, never as confirmed); refuted and
/// entered-in-error allergies are not shared.
pub fn allergy(v: &model::AllergyIntolerance) -> Result<Option<Allergy>, &'static str> {
    let verification = match v
        .verification_status
        .as_ref()
        .and_then(|c| c.code_in(codes::ALLERGY_VERIFICATION_SYSTEM))
    {
        Some("entered-in-error" | "refuted") => return Ok(None),
        code => code.and_then(AllergyVerification::from_code),
    };
    let status = v
        .clinical_status
        .as_ref()
        .and_then(|c| c.code_in(codes::ALLERGY_CLINICAL_SYSTEM))
        .and_then(AllergyStatus::from_code)
        .ok_or("clinicalStatus missing or not in the R4 value set")?;
    let category = v
        .category
        .first()
        .map(|c| AllergyCategory::from_code(c).ok_or("category not in the R4 value set"))
        .transpose()?;
    let criticality = v
        .criticality
        .as_deref()
        .map(|c| Criticality::from_code(c).ok_or("criticality not in the R4 value set"))
        .transpose()?;
    let mut reactions = Vec::new();
    for r in &v.reaction {
        let first = r.manifestation.first();
        let null_flavour = first.and_then(|m| m.code_in(codes::NULL_FLAVOR)).is_some();
        let manifestation = match first {
            Some(m) if !null_flavour => Some(concept(Some(m))?),
            _ => None,
        };
        let severity = r
            .severity
            .as_deref()
            .map(|s| {
                ReactionSeverity::from_code(s).ok_or("reaction severity not in the R4 value set")
            })
            .transpose()?;
        reactions.push(Reaction {
            manifestation,
            description: r
                .description
                .as_deref()
                .map(|d| text(d, "reaction description too long"))
                .transpose()?,
            severity,
        });
    }
    let note = v
        .note
        .iter()
        .map(|n| n.text.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    Ok(Some(Allergy {
        source_id: source_id(v.id.as_ref())?,
        substance: concept(v.code.as_ref())?,
        category,
        criticality,
        status,
        reactions: BoundedVec::try_from(reactions).map_err(|_| "more than 8 reactions")?,
        onset: v.onset_date_time.as_deref().map(date).transpose()?,
        note: (!note.is_empty())
            .then(|| text(&note, "note too long"))
            .transpose()?,
        provenance: provenance(v.meta.as_ref(), &[v.recorder.as_ref(), v.asserter.as_ref()])?,
        verification,
    }))
}

/// A MedicationStatement as a medication. The first dosage is read: its text, else the
/// words of its structured dose (quantity, frequency, route, "when required"), and its
/// structure when it has one.
pub fn medication(v: &model::MedicationStatement) -> Result<Option<Medication>, &'static str> {
    let status = match v.status.as_deref() {
        Some("entered-in-error" | "not-taken") => return Ok(None),
        Some(s) => MedicationStatus::from_code(s),
        None => None,
    }
    .ok_or("status missing or not in the R4 value set")?;
    let category = v.category.as_ref();
    let course = match category.and_then(|c| c.code_in(codes::COURSE_OF_THERAPY_SYSTEM)) {
        Some(code) => sync_protocol::record::Course::from_code(code),
        None => category
            .and_then(|c| c.text.as_deref())
            .and_then(codes::course_from_text),
    };
    let period = v.effective_period.as_ref();
    let (started, ended) = dates(
        period
            .and_then(|p| p.start.as_deref())
            .or(v.effective_date_time.as_deref()),
        period.and_then(|p| p.end.as_deref()),
    )?;
    let last_issued = model::extension(&v.extension, codes::LAST_ISSUE_EXTENSION)
        .and_then(|e| e.value_date_time.as_deref())
        .map(date)
        .transpose()?;
    let prescribed_elsewhere =
        model::extension(&v.extension, codes::PRESCRIBING_ORG_EXTENSION).and_then(|e| {
            // UK Core's valueCodeableConcept; valueCoding as older exports wrote it.
            e.value_codeable_concept
                .as_ref()
                .and_then(|c| c.code_in(codes::PRESCRIBING_ORG_SYSTEM))
                .or_else(|| e.value_coding.as_ref().and_then(|c| c.code.as_deref()))
        }) == Some(codes::prescribing_org(true).0);
    let dosage = v
        .dosage
        .first()
        .map(crate::dosage::read)
        .transpose()?
        .flatten();
    let dose_text = match v.dosage.first() {
        Some(d) => match d.text.as_deref() {
            Some(t) => Some(t.to_owned()),
            None => crate::dosage::words(d),
        },
        None => None,
    }
    .map(|t| text(&t, "dose text too long"))
    .transpose()?;
    Ok(Some(Medication {
        source_id: source_id(v.id.as_ref())?,
        medicine: concept(v.medication_codeable_concept.as_ref())?,
        dose_text,
        status,
        course,
        started,
        last_issued,
        prescribed_elsewhere,
        provenance: provenance(v.meta.as_ref(), &[v.information_source.as_ref()])?,
        ended,
        dosage,
    }))
}

/// A RelatedPerson as a key contact; an inactive one is not shared.
pub fn related_person(v: &model::RelatedPerson) -> Result<Option<KeyContact>, &'static str> {
    if v.active == Some(false) {
        return Ok(None);
    }
    let relationship = v.relationship.first();
    let role = codes::contact_role_from(
        relationship.and_then(|r| r.code_in(codes::ROLE_CODE)),
        relationship.and_then(|r| r.code_in(codes::CONTACT_ROLE_V2)),
    );
    let name = v.name.first().ok_or("RelatedPerson without a name")?;
    let name = match &name.text {
        Some(t) => t.clone(),
        None => format!(
            "{} {}",
            name.given.join(" "),
            name.family.as_deref().unwrap_or("")
        )
        .trim()
        .to_owned(),
    };
    if name.is_empty() {
        return Err("RelatedPerson without a name");
    }
    let phone = v
        .telecom
        .iter()
        .find(|c| c.system.as_deref() == Some("phone"))
        .and_then(|c| c.value.as_deref())
        .map(|p| text(p, "phone number too long"))
        .transpose()?;
    Ok(Some(KeyContact {
        role,
        name: text(&name, "contact name too long")?,
        relationship: relationship
            .and_then(|r| r.text.as_deref())
            .map(|t| text(t, "relationship too long"))
            .transpose()?,
        phone,
        provenance: provenance(v.meta.as_ref(), &[])?,
    }))
}

/// True for a List saying the source cannot provide the patient's allergies (code
/// 886921000000105 with an `emptyReason`).
pub fn allergies_unavailable(l: &model::List) -> bool {
    l.code
        .as_ref()
        .and_then(|c| c.code_in(SNOMED_SYSTEM))
        .is_some_and(|c| c == codes::ALLERGY_LIST_CODE)
        && l.empty_reason.is_some()
}

/// Which sections a partial objection withholds.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Sections {
    /// Alerts (Flag).
    pub alerts: bool,
    /// Allergies (AllergyIntolerance).
    pub allergies: bool,
    /// Medications (MedicationStatement and the other medication resources).
    pub medications: bool,
    /// Key contacts (RelatedPerson).
    pub contacts: bool,
}

impl Sections {
    /// Both sets.
    pub fn union(self, o: Self) -> Self {
        Self {
            alerts: self.alerts || o.alerts,
            allergies: self.allergies || o.allergies,
            medications: self.medications || o.medications,
            contacts: self.contacts || o.contacts,
        }
    }

    /// True if every section of `o` is in `self`.
    pub fn covers(self, o: Self) -> bool {
        (self.alerts || !o.alerts)
            && (self.allergies || !o.allergies)
            && (self.medications || !o.medications)
            && (self.contacts || !o.contacts)
    }
}

/// What a denial covers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DenialScope {
    /// The whole patient.
    Patient,
    /// These sections only.
    Sections(Sections),
}

impl DenialScope {
    /// True if `self` withholds at least what `o` does.
    pub fn covers(self, o: Self) -> bool {
        match (self, o) {
            (Self::Patient, _) => true,
            (Self::Sections(_), Self::Patient) => false,
            (Self::Sections(a), Self::Sections(b)) => a.covers(b),
        }
    }
}

/// A patient-privacy Consent that denies, as read.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Denial {
    /// True for a readable withdrawal (status `inactive` or `rejected`).
    pub withdrawn: bool,
    /// The earliest and latest instants its `dateTime` allows; `None` if it has none or
    /// it cannot be read.
    pub when: Option<(Timestamp, Timestamp)>,
    /// What it denies.
    pub scope: DenialScope,
    /// `meta.lastUpdated`, if readable.
    pub last_updated: Option<Timestamp>,
}

impl Denial {
    /// How a Consent that cannot be read counts: an objection to the whole patient, in
    /// force, that no withdrawal can be ordered after.
    pub fn unreadable() -> Self {
        Self {
            withdrawn: false,
            when: None,
            scope: DenialScope::Patient,
            last_updated: None,
        }
    }
}

/// A Consent as the sharing rules read it. `Ok(None)`: it does not restrict sharing (a
/// consent of another scope, a permit with nothing denied, entered in error). `Ok(Some)`:
/// a denial (an objection, partial or whole, or its withdrawal). `Err`: it cannot be read
/// — the caller counts it as a standing objection to the whole patient.
///
/// Fail-closed rules (tools/hub/README.md, "Objections"):
/// - scope `patient-privacy`, or no readable scope at all, is a privacy consent; another
///   scope (treatment, research, advance directive) does not restrict sharing;
/// - status `inactive` / `rejected` is a withdrawal, `entered-in-error` is ignored, and
///   every other status — `active`, `proposed`, `draft`, missing or unknown — objects;
/// - the date may be a year, year-month, date or dateTime, with or without a zone, or
///   absent: it is kept as the range of instants it allows;
/// - a top-level `deny` limited by `class` to data classes the mapper knows withholds
///   those sections; any other limit (codes, nested exceptions, unknown classes) withholds
///   the whole patient; a `permit` with nested `deny` provisions denies what they name; a
///   provision of no readable type denies the whole patient.
pub fn consent(v: &model::Consent) -> Result<Option<Denial>, &'static str> {
    let scopes: Vec<&str> = v
        .scope
        .iter()
        .flat_map(|s| &s.coding)
        .filter_map(|c| c.code.as_deref())
        .collect();
    let privacy = scopes.is_empty() || scopes.contains(&"patient-privacy");
    if !privacy {
        return Ok(None);
    }
    let withdrawn = match v.status.as_deref() {
        Some("entered-in-error") => return Ok(None),
        Some("inactive" | "rejected") => true,
        _ => false,
    };
    let scope = match &v.provision {
        None => DenialScope::Patient,
        Some(p) => match provision_denies(p, 0) {
            Some(scope) => scope,
            None => return Ok(None),
        },
    };
    Ok(Some(Denial {
        withdrawn,
        when: v.date_time.as_deref().and_then(instant_range),
        scope,
        last_updated: v
            .meta
            .as_ref()
            .and_then(|m| m.last_updated.as_deref())
            .and_then(|t| instant(t).ok()),
    }))
}

/// What a provision denies; `None` if it denies nothing.
fn provision_denies(p: &model::Provision, depth: u8) -> Option<DenialScope> {
    match p.kind.as_deref() {
        Some("deny") => {
            if !p.provision.is_empty() || !p.code.is_empty() || depth > 2 {
                // Exceptions inside a denial, or a denial limited by codes, cannot be
                // classified into sections: the whole patient.
                return Some(DenialScope::Patient);
            }
            if p.class.is_empty() {
                return Some(DenialScope::Patient);
            }
            let mut sections = Sections::default();
            for class in &p.class {
                let known_system =
                    matches!(class.system.as_deref(), None | Some(codes::RESOURCE_TYPES));
                match (known_system, class.code.as_deref()) {
                    (true, Some("Flag")) => sections.alerts = true,
                    (true, Some("AllergyIntolerance")) => sections.allergies = true,
                    (
                        true,
                        Some(
                            "MedicationStatement"
                            | "MedicationRequest"
                            | "Medication"
                            | "MedicationAdministration"
                            | "MedicationDispense",
                        ),
                    ) => sections.medications = true,
                    (true, Some("RelatedPerson")) => sections.contacts = true,
                    _ => return Some(DenialScope::Patient),
                }
            }
            Some(DenialScope::Sections(sections))
        }
        Some("permit") => {
            let mut out: Option<DenialScope> = None;
            for n in &p.provision {
                match (out, provision_denies(n, depth.saturating_add(1))) {
                    (_, None) => {}
                    (_, Some(DenialScope::Patient)) => return Some(DenialScope::Patient),
                    (None, Some(s)) => out = Some(s),
                    (Some(DenialScope::Sections(a)), Some(DenialScope::Sections(b))) => {
                        out = Some(DenialScope::Sections(a.union(b)));
                    }
                    (Some(DenialScope::Patient), Some(_)) => {
                        return Some(DenialScope::Patient);
                    }
                }
            }
            out
        }
        // A provision whose type cannot be read, in a privacy consent: the whole patient.
        _ => Some(DenialScope::Patient),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// The provenance of a Flag written as `v`.
    fn prov(v: Value) -> Result<Provenance, &'static str> {
        let mut v = v;
        if let Some(o) = v.as_object_mut() {
            o.insert("resourceType".into(), "AllergyIntolerance".into());
        }
        let r: model::AllergyIntolerance = serde_json::from_value(v).unwrap();
        provenance(r.meta.as_ref(), &[r.recorder.as_ref(), r.asserter.as_ref()])
    }

    /// Codings as they are in the wild: SNOMED CT first, then dm+d, Read, CTV3, local;
    /// a broken coding is passed over; text alone is an item; nothing to show is an error.
    #[test]
    fn concepts_read_every_coding_system_and_text() {
        use serde_json::json;
        let c = |v: Value| concept(Some(&serde_json::from_value(v).unwrap()));
        let local = c(json!({ "coding": [{ "system": "https://gp.invalid/cs", "code": "DNR", "display": "DNACPR" }] })).unwrap();
        assert_eq!(
            local.code.as_ref().map(Code::system),
            Some("https://gp.invalid/cs")
        );
        assert_eq!(local.display.as_str(), "DNACPR");
        let dmd = c(json!({ "coding": [{ "system": DMD_SYSTEM, "code": "39732311000001104", "display": "Amoxicillin 250mg capsules" }] })).unwrap();
        assert!(matches!(dmd.code, Some(Code::Dmd(_))));
        let both = c(json!({ "coding": [
            { "system": "https://gp.invalid/cs", "code": "X", "display": "local words" },
            { "system": SNOMED_SYSTEM, "code": "450476008", "display": "Not for CPR" },
        ] }))
        .unwrap();
        assert!(matches!(both.code, Some(Code::Snomed(_))));
        let broken_snomed = c(json!({ "coding": [
            { "system": SNOMED_SYSTEM, "code": "450476009", "display": "typo" },
            { "system": READ_V2_SYSTEM, "code": "1JC..", "display": "read words" },
        ] }))
        .unwrap();
        assert!(matches!(broken_snomed.code, Some(Code::ReadV2(_))));
        let text_only = c(json!({ "text": "penicillin - rash" })).unwrap();
        assert_eq!(text_only.code, None);
        assert_eq!(text_only.display.as_str(), "penicillin - rash");
        let borrowed = c(json!({ "coding": [{ "system": "https://gp.invalid/cs", "code": "X" }], "text": "words" })).unwrap();
        assert_eq!(borrowed.display.as_str(), "words");
        assert!(
            c(json!({ "coding": [{ "system": "https://gp.invalid/cs", "code": "X" }] })).is_err()
        );
        assert!(c(json!({})).is_err());
    }

    /// Provenance without an ODS code is kept as it is, never an error.
    #[test]
    fn provenance_keeps_what_the_source_gives() {
        use serde_json::json;
        let p = prov(json!({ "recorder": { "display": "Dr A Example" } })).unwrap();
        assert_eq!(p.organisation, None);
        assert_eq!(
            p.recorded_by.as_ref().map(Text::as_str),
            Some("Dr A Example")
        );
        assert_eq!(p.last_updated, None);
        let p = prov(json!({ "asserter": { "reference": "Practitioner/pr-1" }, "meta": { "lastUpdated": "2024-01-01T00:00:00Z" } })).unwrap();
        assert_eq!(
            p.recorded_by.as_ref().map(Text::as_str),
            Some("Practitioner/pr-1")
        );
        assert!(p.last_updated.is_some());
        let p = prov(json!({ "recorder": { "type": "Organization", "identifier": { "system": codes::ODS_SYSTEM, "value": "M85001" } } })).unwrap();
        assert_eq!(p.organisation.as_ref().map(OdsCode::as_str), Some("M85001"));
        assert_eq!(p.recorded_by, None);
        let p = prov(json!({})).unwrap();
        assert_eq!(
            p,
            Provenance {
                organisation: None,
                recorded_by: None,
                last_updated: None
            }
        );
    }
}
