//! A synthetic shared care record: patients as the upstream holds them, with the things
//! a hub must filter — objections, sensitive items, entered-in-error items — and what a
//! device should end up with after the sharing rules (`expected`).

use rand::Rng;
use sync_protocol::NhsNumber;
use sync_protocol::record::Section;
use sync_protocol::record::{
    Alert, AlertCategory, AlertSeverity, Allergy, AllergyStatus, AllergyVerification, Dosage,
    DoseQuantity, Medication, MedicationStatus, PatientRecord, Period, PeriodUnit,
};
use sync_protocol::types::{
    Code, Coding, Date, Decimal, Provenance, SctId, SourceId, Text, Timestamp,
};

use crate::{Generator, coding, stamp};

fn text<const N: usize>(s: &str) -> Text<N> {
    Text::new(s).unwrap_or_else(|_| unreachable!("short printable text"))
}

/// The objection shapes, in the order the dataset cycles through them.
fn objection_shape(n: usize, recorded_at: Timestamp) -> Objection {
    use ConsentDate as D;
    use ConsentStatus as S;
    let base = |date, status, provision| Objection {
        recorded_at,
        withdrawn: false,
        date,
        status,
        provision,
        later_withdrawal: None,
    };
    let shapes = [
        base(D::Instant, S::Given, Provision::Deny),
        base(D::Date, S::Given, Provision::Deny),
        base(D::YearMonth, S::Given, Provision::Deny),
        base(D::Year, S::Given, Provision::Deny),
        base(D::Absent, S::Given, Provision::Deny),
        base(D::NoZone, S::Given, Provision::Deny),
        base(D::Date, S::Missing, Provision::Deny),
        base(D::Instant, S::Proposed, Provision::Deny),
        base(
            D::Date,
            S::Given,
            Provision::DenyClasses(vec!["MedicationStatement"]),
        ),
        base(
            D::Year,
            S::Given,
            Provision::DenyClasses(vec!["Flag", "RelatedPerson"]),
        ),
        base(D::Instant, S::Given, Provision::DenyCode),
        base(D::Date, S::Given, Provision::Untyped),
        Objection {
            later_withdrawal: Some(LaterWithdrawal::ClearlyLater),
            ..base(D::Date, S::Given, Provision::Deny)
        },
        Objection {
            later_withdrawal: Some(LaterWithdrawal::Ambiguous),
            ..base(D::Year, S::Given, Provision::Deny)
        },
        Objection {
            withdrawn: true,
            ..base(D::YearMonth, S::Given, Provision::Deny)
        },
        Objection {
            withdrawn: true,
            ..base(
                D::Date,
                S::Given,
                Provision::DenyClasses(vec!["AllergyIntolerance"]),
            )
        },
    ];
    let i = n % shapes.len();
    shapes
        .into_iter()
        .nth(i)
        .unwrap_or_else(|| unreachable!("index within the table"))
}

/// Codes on the sensitive list (GP summary exclusion areas: sexually transmitted
/// infection, HIV, gender identity, termination of pregnancy). Synthetic items carrying
/// them must never reach a device; the hub's code-list file holds them (a hub test checks).
pub const SENSITIVE_CODES: &[(u64, &str)] = &[
    (86406008, "Human immunodeficiency virus infection"),
    (105629000, "Chlamydial infection"),
    (15628003, "Gonorrhoea"),
    (93461009, "Gender dysphoria"),
    (714812005, "Induced termination of pregnancy"),
];

/// Sensitivity labels (v3 ActCode) a source may put on an item's `meta.security`.
pub const SENSITIVE_LABELS: &[&str] = &["SEX", "STD", "HIV", "SDV"];

/// An item the hub must withhold, and how it is recognisable.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Withheld {
    /// An alert coded from the sensitive code list.
    CodedAlert(Alert),
    /// A medication coded under dm+d with a listed code.
    DmdMedication(Medication),
    /// An alert with a local code the region's map sends to a listed concept.
    LocalCodedAlert(Alert),
    /// A medication carrying a sensitivity label.
    LabelledMedication(Medication, &'static str),
    /// A medication whose confidentiality is `R` (restricted).
    RestrictedMedication(Medication),
}

/// How a Consent writes its `dateTime`: every shape valid FHIR allows, and none.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ConsentDate {
    /// `2024-03-01T10:00:00Z`
    Instant,
    /// `2024-03-01T10:00:00` (no zone: invalid FHIR, seen in exports)
    NoZone,
    /// `2024-03-01`
    Date,
    /// `2024-03`
    YearMonth,
    /// `2024`
    Year,
    /// No `dateTime` (and no `meta.lastUpdated`).
    Absent,
}

/// How a Consent writes its `status`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ConsentStatus {
    /// `active` (or `inactive` once withdrawn).
    Given,
    /// No status (poor exports).
    Missing,
    /// `proposed`.
    Proposed,
}

/// What a Consent's provision says.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Provision {
    /// `deny`, unlimited: the whole record.
    Deny,
    /// `deny` limited by `class` to these resource types: those sections only.
    DenyClasses(Vec<&'static str>),
    /// `deny` limited by a code: cannot be classified, so the whole record.
    DenyCode,
    /// A provision with no type: cannot be read, so the whole record.
    Untyped,
}

/// A second Consent recording a withdrawal, beside a standing one.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum LaterWithdrawal {
    /// Dated, without doubt, after the objection: lifts it.
    ClearlyLater,
    /// Dated so imprecisely that it may precede the objection: the objection stands.
    Ambiguous,
}

/// A patient's objection as the source records it (FHIR Consent, scope patient-privacy)
/// in one of the shapes real exports use.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Objection {
    /// When the objection was recorded.
    pub recorded_at: Timestamp,
    /// True if the patient withdrew it (the same Consent is `inactive`).
    pub withdrawn: bool,
    /// How the date is written.
    pub date: ConsentDate,
    /// How the status is written.
    pub status: ConsentStatus,
    /// What it denies.
    pub provision: Provision,
    /// A separate withdrawal Consent, if any.
    pub later_withdrawal: Option<LaterWithdrawal>,
}

impl Objection {
    /// True if, by the fail-closed rules, the patient objects to the whole record.
    pub fn objects_whole(&self) -> bool {
        !self.withdrawn
            && !matches!(self.provision, Provision::DenyClasses(_))
            && self.later_withdrawal != Some(LaterWithdrawal::ClearlyLater)
    }

    /// True if the Consent is written as poor exports write it — no status, or a
    /// dateTime without a zone — which a strict FHIR R4 validator refuses (a server would
    /// not accept it; a bulk export may still carry it).
    pub fn poor_export(&self) -> bool {
        self.status == ConsentStatus::Missing || self.date == ConsentDate::NoZone
    }

    /// The resource types a standing partial objection withholds.
    pub fn withheld_classes(&self) -> &[&'static str] {
        match (&self.provision, self.withdrawn) {
            (Provision::DenyClasses(c), false) => c,
            _ => &[],
        }
    }
}

/// A resource deleted at the source between two exports.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Deleted {
    /// FHIR resource type.
    pub resource_type: &'static str,
    /// FHIR id.
    pub id: String,
}

/// An item written so that the hub cannot read it (valid FHIR, no words to show): it
/// must be counted as "could not be shown", never silently dropped.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Unreadable {
    /// A Flag coded with a local code and no display or text.
    Alert,
    /// A MedicationStatement naming its medicine only by a Medication reference.
    Medication,
}

/// The local code system synthetic alerts use (as a GP system's own codes would be).
pub const LOCAL_ALERT_SYSTEM: &str = "https://gp-system.invalid/CodeSystem/alert-codes";

/// A local code for an alert concept (the map a region would publish from them is
/// `local_code_map`).
pub fn local_alert_code(sctid: u64) -> String {
    format!("LA{}", sctid % 100_000)
}

/// The local-code map CSV for the synthetic alerts' local codes, and a locally coded
/// sensitive concept (`LASX1` → HIV infection), as a region would publish it.
pub fn local_code_map() -> String {
    let mut out = String::from(
        "# carecache synthetic local-code map: the synthetic GP system's alert codes\n# version: synthetic-1\nsystem,code,snomed,display\n",
    );
    for (code, display, ..) in crate::ALERT_CODES {
        out.push_str(&format!(
            "{LOCAL_ALERT_SYSTEM},{},{code},{display}\n",
            local_alert_code(*code)
        ));
    }
    out.push_str(&format!(
        "{LOCAL_ALERT_SYSTEM},{SENSITIVE_LOCAL_CODE},86406008,Human immunodeficiency virus infection\n"
    ));
    out
}

/// A local alert code the synthetic map sends to a sensitive SNOMED CT concept.
pub const SENSITIVE_LOCAL_CODE: &str = "LASX1";

/// One patient of the synthetic record.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct SourcePatient {
    /// The FHIR id of the Patient resource (not the NHS number).
    pub fhir_id: String,
    /// What a device may hold after the sharing rules (its `version` is not meaningful:
    /// the hub assigns versions).
    pub expected: PatientRecord,
    /// Items the hub must withhold; `expected.withheld` is their count.
    pub withheld: Vec<Withheld>,
    /// An allergy recorded in error: never shared, never counted.
    pub entered_in_error: Option<Allergy>,
    /// The patient's objection, if any.
    pub objection: Option<Objection>,
    /// Items written unreadable (counted in `expected.unreadable`).
    pub unreadable: Vec<Unreadable>,
    /// When the source last changed the Patient resource.
    pub last_updated: Timestamp,
}

impl SourcePatient {
    /// The NHS number.
    pub fn nhs_number(&self) -> NhsNumber {
        self.expected.nhs_number
    }

    /// True if a device may hold this patient (no standing objection to the whole
    /// record; a partial objection leaves the rest shareable).
    pub fn shareable(&self) -> bool {
        self.objection.as_ref().is_none_or(|o| !o.objects_whole())
    }

    /// True if a device may hold this patient and they have a high-risk alert and a
    /// recorded allergy: the patient to show first in demos and viewer tests.
    pub fn worth_showing(&self) -> bool {
        self.shareable()
            && !self.expected.allergies.entries().is_empty()
            && self
                .expected
                .alerts
                .entries()
                .iter()
                .any(|a| a.severity == AlertSeverity::HighRisk)
    }
}

impl Generator {
    /// `n` patients of a synthetic shared care record: about 2 % with a standing
    /// objection (and 0.5 % with a withdrawn one), 4 % with sensitive items, 3 % with an
    /// item entered in error.
    pub fn source_patients(&mut self, n: usize) -> Vec<SourcePatient> {
        (0..n).map(|i| self.source_patient(i)).collect()
    }

    /// The `index`-th patient of a source: called with 0, 1, 2, … on a new generator,
    /// the same patients as [`Self::source_patients`], one at a time.
    pub fn source_patient(&mut self, index: usize) -> SourcePatient {
        let mut expected = self.patient();
        renumber(&mut expected, index);
        self.fieldify(&mut expected);
        let mut withheld = Vec::new();
        if self.rng.random_ratio(1, 25) {
            for k in 0..self.rng.random_range(1..=2) {
                withheld.push(self.withheld_item(index, k));
            }
        }
        expected.withheld = u16::try_from(withheld.len()).unwrap_or(u16::MAX);
        let entered_in_error = self.rng.random_ratio(1, 33).then(|| {
            let mut a = self.allergy(0);
            a.source_id = id(&format!("alg-{index}-eie"));
            a
        });
        let mut unreadable = Vec::new();
        if self.rng.random_ratio(1, 20) {
            unreadable.push(Unreadable::Alert);
            expected.unreadable.alerts += 1;
            if matches!(expected.alerts, Section::NoneRecorded) {
                expected.alerts = Section::NotAvailable;
            }
        }
        if self.rng.random_ratio(1, 20) {
            unreadable.push(Unreadable::Medication);
            expected.unreadable.medications += 1;
            if matches!(expected.medications, Section::NoneRecorded) {
                expected.medications = Section::NotAvailable;
            }
        }
        let recorded_at = stamp(&self.provenance());
        // Every objection shape appears in any run of a few hundred patients: one patient
        // in twelve objects, in the next shape of the cycle.
        let objection = if index % 12 == 7 {
            Some(objection_shape(index / 12, recorded_at))
        } else {
            None
        };
        if let Some(o) = &objection {
            for class in o.withheld_classes() {
                match *class {
                    "Flag" => {
                        expected.alerts = Section::WithheldByPatient;
                        expected.unreadable.alerts = 0;
                    }
                    "AllergyIntolerance" => {
                        expected.allergies = Section::WithheldByPatient;
                        expected.unreadable.allergies = 0;
                    }
                    "MedicationStatement" => {
                        expected.medications = Section::WithheldByPatient;
                        expected.unreadable.medications = 0;
                    }
                    _ => {
                        expected.contacts = Section::WithheldByPatient;
                        expected.unreadable.contacts = 0;
                    }
                }
            }
        }
        SourcePatient {
            fhir_id: format!("pat-{index}-{:08x}", self.rng.random::<u32>()),
            expected,
            withheld,
            entered_in_error,
            objection,
            unreadable,
            last_updated: stamp(&self.provenance()),
        }
    }

    /// Rewrite items the way GP and community systems record them: dm+d-coded medicines
    /// (and some text only), locally coded alerts (DNACPR among them), free-text
    /// allergies, and provenance without an ODS code (a recorder's name, a Practitioner
    /// reference, or nothing but the time; sometimes not even that).
    fn fieldify(&mut self, r: &mut PatientRecord) {
        if let Section::Entries(items) = &mut r.alerts {
            let mut items = std::mem::take(items).into_inner();
            for a in &mut items {
                if self.rng.random_ratio(1, 3)
                    && let Some(id) = a.code.sctid()
                {
                    a.code.code = Some(Code::Other {
                        system: text(LOCAL_ALERT_SYSTEM),
                        code: text(&local_alert_code(id.as_u64())),
                    });
                }
                self.field_provenance(&mut a.provenance);
            }
            r.alerts = Section::from_items(items).unwrap_or(Section::NotAvailable);
        }
        if let Section::Entries(items) = &mut r.allergies {
            let mut items = std::mem::take(items).into_inner();
            for a in &mut items {
                if self.rng.random_ratio(1, 4) {
                    // "penicillin - rash": free text only, as many systems hold it.
                    a.substance.code = None;
                }
                a.verification = match self.rng.random_range(0..10) {
                    0 => None,
                    1 | 2 => Some(AllergyVerification::Unconfirmed),
                    _ => Some(AllergyVerification::Confirmed),
                };
                self.field_provenance(&mut a.provenance);
            }
            r.allergies = Section::from_items(items).unwrap_or(Section::NotAvailable);
        }
        if let Section::Entries(items) = &mut r.medications {
            let mut items = std::mem::take(items).into_inner();
            for m in &mut items {
                // One in eight has ended (completed), a year or two after it started.
                if self.rng.random_ratio(1, 8)
                    && let Some(started) = m.started
                {
                    let y = started.year().saturating_add(self.rng.random_range(1..=2));
                    m.ended = Date::ymd(y, 1, 15).ok();
                    m.status = MedicationStatus::Completed;
                }
                match self.rng.random_range(0..20) {
                    0 => m.medicine.code = None,
                    1..=14 => {
                        if let Some(id) = m.medicine.sctid() {
                            m.medicine.code = Some(Code::Dmd(id));
                        }
                    }
                    _ => {}
                }
                // One in five has a structured dose, written out in words; some sources
                // export only the structure (`fhir::medication`), and the hub then
                // writes the words.
                if self.rng.random_ratio(1, 5) {
                    let inhaled = m.medicine.display.as_str().contains("inhaler");
                    let d = self.dosage(inhaled);
                    m.dose_text = carecache_fhir::dosage::write(None, Some(&d))
                        .and_then(|f| carecache_fhir::dosage::words(&f))
                        .map(|w| text(&w));
                    m.dosage = Some(d);
                }
                self.field_provenance(&mut m.provenance);
            }
            r.medications = Section::from_items(items).unwrap_or(Section::NotAvailable);
        }
    }

    fn dosage(&mut self, inhaled: bool) -> Dosage {
        let (value, unit) = *[
            (1.0, "tablet"),
            (2.0, "tablet"),
            (5.0, "mL"),
            (0.5, "tablet"),
        ]
        .get(self.rng.random_range(0..4))
        .unwrap_or(&(1.0, "tablet"));
        if inhaled {
            return Dosage {
                dose: Decimal::from_f64(2.0).ok().map(|value| DoseQuantity {
                    value,
                    unit: Some(text("puff")),
                }),
                frequency: Some(4),
                period: Decimal::from_f64(1.0).ok(),
                period_unit: Some(PeriodUnit::Day),
                // A route recorded as text only.
                route: Some(Coding {
                    code: None,
                    display: text("inhaled"),
                }),
                as_needed: true,
            };
        }
        Dosage {
            dose: Decimal::from_f64(value).ok().map(|value| DoseQuantity {
                value,
                unit: Some(text(unit)),
            }),
            frequency: Some(self.rng.random_range(1..=4)),
            period: Decimal::from_f64(1.0).ok(),
            period_unit: Some(PeriodUnit::Day),
            route: SctId::new(26643006).ok().map(|id| Coding {
                code: Some(Code::Snomed(id)),
                display: text("Oral"),
            }),
            as_needed: self.rng.random_ratio(1, 4),
        }
    }

    fn field_provenance(&mut self, p: &mut Provenance) {
        match self.rng.random_range(0..10) {
            0 => {
                p.organisation = None;
                p.recorded_by = Some(text(&format!("Dr {}", self.pick(crate::codes::FAMILY))));
            }
            1 => {
                p.organisation = None;
                p.recorded_by = Some(text(&format!(
                    "Practitioner/pr-{}",
                    self.rng.random_range(1..500)
                )));
            }
            2 => {
                p.organisation = None;
                if self.rng.random_ratio(1, 3) {
                    p.last_updated = None;
                }
            }
            _ => {}
        }
    }

    fn withheld_item(&mut self, index: usize, k: usize) -> Withheld {
        match self.rng.random_range(0..5) {
            3 => {
                let (code, display) = self.pick(SENSITIVE_CODES);
                let mut m = self.medication(0);
                m.source_id = id(&format!("med-{index}-d{k}"));
                m.status = MedicationStatus::Active;
                m.medicine = Coding {
                    code: Some(Code::Dmd(
                        SctId::new(code).unwrap_or_else(|_| unreachable!("listed code")),
                    )),
                    display: text(display),
                };
                Withheld::DmdMedication(m)
            }
            4 => Withheld::LocalCodedAlert(Alert {
                source_id: id(&format!("flag-{index}-l{k}")),
                category: AlertCategory::ClinicalWarning,
                code: Coding {
                    code: Some(Code::Other {
                        system: text(LOCAL_ALERT_SYSTEM),
                        code: text(SENSITIVE_LOCAL_CODE),
                    }),
                    display: text("Clinical note"),
                },
                detail: None,
                period: Period::default(),
                severity: AlertSeverity::Warning,
                provenance: self.provenance(),
            }),
            0 => {
                let (code, display) = self.pick(SENSITIVE_CODES);
                Withheld::CodedAlert(Alert {
                    source_id: id(&format!("flag-{index}-s{k}")),
                    category: AlertCategory::ClinicalWarning,
                    code: coding(code, display),
                    detail: None,
                    period: Period::new(Some(self.date(2015, 2024)), None)
                        .unwrap_or_else(|_| unreachable!("open-ended")),
                    severity: AlertSeverity::Warning,
                    provenance: self.provenance(),
                })
            }
            1 => {
                let mut m = self.medication(0);
                m.source_id = id(&format!("med-{index}-s{k}"));
                m.status = MedicationStatus::Active;
                let label = self.pick(SENSITIVE_LABELS);
                Withheld::LabelledMedication(m, label)
            }
            _ => {
                let mut m = self.medication(0);
                m.source_id = id(&format!("med-{index}-r{k}"));
                Withheld::RestrictedMedication(m)
            }
        }
    }
}

/// Give every item a FHIR id unique in the dataset (`flag-7-0`, `alg-7-1`, …).
/// Empty alert, medication and contact sections become "none recorded" (the source
/// holds no entries); an empty allergy section stays "not available", which the source
/// states with an empty List (`emptyReason` unavailable).
fn renumber(record: &mut PatientRecord, index: usize) {
    use sync_protocol::record::Section;
    if matches!(record.alerts, Section::NotAvailable) {
        record.alerts = Section::NoneRecorded;
    }
    if matches!(record.medications, Section::NotAvailable) {
        record.medications = Section::NoneRecorded;
    }
    if matches!(record.contacts, Section::NotAvailable) {
        record.contacts = Section::NoneRecorded;
    }
    if let Section::Entries(items) = &mut record.alerts {
        let mut items = std::mem::take(items).into_inner();
        for (i, a) in items.iter_mut().enumerate() {
            a.source_id = id(&format!("flag-{index}-{i}"));
        }
        record.alerts = Section::from_items(items).unwrap_or(Section::NotAvailable);
    }
    if let Section::Entries(items) = &mut record.allergies {
        let mut items = std::mem::take(items).into_inner();
        for (i, a) in items.iter_mut().enumerate() {
            a.source_id = id(&format!("alg-{index}-{i}"));
            // A resolved allergy is still shared (shown as resolved), never dropped.
            if a.status == AllergyStatus::Inactive {
                a.status = AllergyStatus::Resolved;
            }
        }
        record.allergies = Section::from_items(items).unwrap_or(Section::NotAvailable);
    }
    if let Section::Entries(items) = &mut record.medications {
        let mut items = std::mem::take(items).into_inner();
        for (i, m) in items.iter_mut().enumerate() {
            m.source_id = id(&format!("med-{index}-{i}"));
        }
        record.medications = Section::from_items(items).unwrap_or(Section::NotAvailable);
    }
}

fn id(s: &str) -> SourceId {
    SourceId::new(s).unwrap_or_else(|_| unreachable!("short ASCII id"))
}

/// Delete at the source, between two exports: `items` alerts or medications of
/// shareable patients (each leaves its section), and `patients` whole patients.
/// Returns every resource deleted; `patients` is changed to what the source holds
/// afterwards (its `expected` records included).
pub fn delete_at_source(
    patients: &mut Vec<SourcePatient>,
    items: usize,
    whole: usize,
) -> Vec<Deleted> {
    let mut out = Vec::new();
    let mut deleted_items = 0;
    for p in patients.iter_mut().filter(|p| p.shareable()) {
        if deleted_items >= items {
            break;
        }
        if let Section::Entries(list) = &p.expected.alerts
            && list.len() > 1
        {
            let mut list = list.clone().into_inner();
            let gone = list.remove(0);
            out.push(Deleted {
                resource_type: "Flag",
                id: gone.source_id.as_str().to_owned(),
            });
            p.expected.alerts = Section::from_items(list).unwrap_or(Section::NotAvailable);
            deleted_items += 1;
        } else if let Section::Entries(list) = &p.expected.medications {
            let mut list = list.clone().into_inner();
            let gone = list.remove(0);
            out.push(Deleted {
                resource_type: "MedicationStatement",
                id: gone.source_id.as_str().to_owned(),
            });
            p.expected.medications = if list.is_empty() && p.expected.unreadable.medications > 0 {
                Section::NotAvailable
            } else {
                Section::from_items(list).unwrap_or(Section::NotAvailable)
            };
            deleted_items += 1;
        }
    }
    let mut removed = 0;
    let mut i = patients.len();
    while removed < whole && i > 0 {
        i -= 1;
        let shareable = patients.get(i).is_some_and(SourcePatient::shareable);
        if shareable {
            let p = patients.remove(i);
            for r in crate::fhir::resources(&p) {
                if let (Some(kind), Some(id)) = (
                    r.get("resourceType").and_then(serde_json::Value::as_str),
                    r.get("id").and_then(serde_json::Value::as_str),
                ) {
                    out.push(Deleted {
                        resource_type: match kind {
                            "Patient" => "Patient",
                            "Flag" => "Flag",
                            "AllergyIntolerance" => "AllergyIntolerance",
                            "MedicationStatement" => "MedicationStatement",
                            "RelatedPerson" => "RelatedPerson",
                            "List" => "List",
                            _ => "Consent",
                        },
                        id: id.to_owned(),
                    });
                }
            }
            removed += 1;
        }
    }
    out
}
