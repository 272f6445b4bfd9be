//! Code tables. SNOMED CT and dm+d codes are those of the domain notes (§9), where each
//! has its public source; re-verify against the current UK release before any clinical
//! use. Names and places are synthetic.

use sync_protocol::record::{AlertCategory, AlertSeverity, AllergyCategory, ContactRole};

type AlertRow = (
    u64,
    &'static str,
    AlertCategory,
    AlertSeverity,
    Option<&'static str>,
);

/// Alerts: code, display, category, severity, detail.
pub const ALERT_CODES: &[AlertRow] = &[
    (
        315594003,
        "Interpreter needed",
        AlertCategory::CommunicationNeed,
        AlertSeverity::Warning,
        Some("Speaks Punjabi; family member usually present"),
    ),
    (
        52448006,
        "Dementia",
        AlertCategory::ReasonableAdjustment,
        AlertSeverity::Warning,
        Some("Calm approach; explain each step"),
    ),
    (
        450476008,
        "Not for cardiopulmonary resuscitation",
        AlertCategory::EndOfLife,
        AlertSeverity::HighRisk,
        Some("DNACPR form held at home, kitchen drawer"),
    ),
    (
        110481000000108,
        "Preferred place of death: home",
        AlertCategory::EndOfLife,
        AlertSeverity::Information,
        None,
    ),
    (
        108401000000102,
        "Preferred place of death: hospice",
        AlertCategory::EndOfLife,
        AlertSeverity::Information,
        None,
    ),
    (
        836881000000105,
        "Child is cause for safeguarding concern",
        AlertCategory::Safeguarding,
        AlertSeverity::HighRisk,
        None,
    ),
    (
        1064961000000107,
        "Child in family is safeguarding concern",
        AlertCategory::Safeguarding,
        AlertSeverity::HighRisk,
        None,
    ),
    (
        417430008,
        "Vulnerable adult",
        AlertCategory::Safeguarding,
        AlertSeverity::Warning,
        None,
    ),
    (
        707087005,
        "At risk of domestic violence",
        AlertCategory::Safeguarding,
        AlertSeverity::HighRisk,
        Some("Do not discuss in presence of partner"),
    ),
    (
        226201008,
        "Peanut-free diet",
        AlertCategory::ClinicalWarning,
        AlertSeverity::Warning,
        None,
    ),
];

/// Allergies: code, display, category.
pub const ALLERGY_CODES: &[(u64, &str, AllergyCategory)] = &[
    (764146007, "Penicillin", AllergyCategory::Medication),
    (372687004, "Amoxicillin", AllergyCategory::Medication),
    (256349002, "Peanut - dietary", AllergyCategory::Food),
    (
        91936005,
        "Allergy to penicillin",
        AllergyCategory::Medication,
    ),
    (
        241933001,
        "Peanut-induced anaphylaxis",
        AllergyCategory::Food,
    ),
];

/// Reaction manifestations.
pub const MANIFESTATIONS: &[(u64, &str)] = &[
    (39579001, "Anaphylaxis"),
    (247472004, "Urticarial rash"),
    (271807003, "Eruption of skin"),
    (422400008, "Vomiting"),
];

/// Medications: dm+d code, display, dose text.
pub const MEDICATION_CODES: &[(u64, &str, &str)] = &[
    (
        39732311000001104,
        "Amoxicillin 250mg capsules",
        "One capsule three times a day",
    ),
    (
        319773006,
        "Aspirin 75mg dispersible tablets",
        "One tablet once a day",
    ),
    (
        322237000,
        "Paracetamol 500mg soluble tablets",
        "Two tablets up to four times a day",
    ),
    (
        322341003,
        "Co-codamol 30mg/500mg tablets",
        "One or two tablets four times a day when required",
    ),
    (
        317972000,
        "Furosemide 40mg tablets",
        "One tablet each morning",
    ),
    (
        325427002,
        "Prednisolone 5mg tablets",
        "Six tablets once a day for five days",
    ),
    (321196004, "Diazepam 2mg tablets", "One tablet at night"),
    (
        18679011000001101,
        "Salbutamol 100micrograms/dose inhaler CFC free",
        "Two puffs when required",
    ),
    (
        36126511000001106,
        "Morphine 10mg modified-release tablets",
        "One tablet twice a day",
    ),
    (
        36120011000001101,
        "Fentanyl 25micrograms/hour transdermal patches",
        "Apply one patch every 72 hours",
    ),
    (
        15517911000001104,
        "Methotrexate 10mg/0.2ml solution for injection pre-filled syringes",
        "10mg once a week on Mondays",
    ),
    (
        39687811000001107,
        "Ciprofloxacin 500mg tablets",
        "One tablet twice a day",
    ),
    (
        322623000,
        "Tramadol 50mg capsules",
        "One or two capsules four times a day",
    ),
];

pub(crate) const CONTACT_ROLES: &[(ContactRole, &str)] = &[
    (ContactRole::NextOfKin, "daughter"),
    (ContactRole::NextOfKin, "son"),
    (ContactRole::Carer, "paid carer"),
    (ContactRole::PowerOfAttorney, "spouse"),
];

pub(crate) const GIVEN_F: &[&str] = &[
    "Amelia", "Olivia", "Priya", "Grace", "Fatima", "Joan", "Margaret", "Aisha", "Sophie", "Edith",
];
pub(crate) const GIVEN_M: &[&str] = &[
    "Oliver", "Harry", "Mohammed", "George", "Arjun", "Albert", "Kwame", "Thomas", "Jack",
    "Stanley",
];
pub(crate) const FAMILY: &[&str] = &[
    "Testpatient",
    "Sample",
    "Example",
    "Fictional",
    "Madeup",
    "Placeholder",
    "Synthetic",
    "Dummy",
];
pub(crate) const POSTCODE_DISTRICTS: &[&str] = &[
    "WV1", "WV10", "DY1", "DY8", "WS1", "WS10", "B66", "B70", "ST4", "TF1",
];
pub(crate) const GP_PRACTICES: &[&str] =
    &["M85001", "M87002", "M88003", "M91004", "M92005", "M89006"];
