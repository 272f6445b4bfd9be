//! Code systems, profile and extension URLs, and the tables between the protocol's enums
//! and FHIR codes — one table per concept, used to write and to read.

use sync_protocol::record::{
    AlertCategory, AlertSeverity, AllergyCategory, AllergyStatus, AllergyVerification, ContactRole,
    Course, Criticality, MedicationStatus, PeriodUnit, ReactionSeverity, Sex,
};

/// NHS number identifier system.
pub const NHS_NUMBER_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhs-number";
/// ODS organisation code identifier system.
pub const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
/// SDS user id (a member of staff).
pub const SDS_USER_SYSTEM: &str = "https://fhir.nhs.uk/Id/sds-user-id";
/// SNOMED CT.
pub const SNOMED: &str = sync_protocol::types::SNOMED_SYSTEM;
/// LOINC.
pub const LOINC: &str = "http://loinc.org";
/// HL7 v3 Confidentiality.
pub const CONFIDENTIALITY: &str = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality";
/// HL7 v3 ActCode (sensitivity labels, consent categories).
pub const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
/// HL7 v3 ActReason (purpose of use, `HTEST`).
pub const ACT_REASON: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";
/// HL7 v3 NullFlavor.
pub const NULL_FLAVOR: &str = "http://terminology.hl7.org/CodeSystem/v3-NullFlavor";
/// Consent scope.
pub const CONSENT_SCOPE: &str = "http://terminology.hl7.org/CodeSystem/consentscope";
/// FHIR resource types (Consent `provision.class`).
pub const RESOURCE_TYPES: &str = "http://hl7.org/fhir/resource-types";
/// List empty reasons.
pub const LIST_EMPTY_REASON: &str = "http://terminology.hl7.org/CodeSystem/list-empty-reason";
/// Flag categories.
pub const FLAG_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/flag-category";
/// The core `flag-priority` extension.
pub const FLAG_PRIORITY_EXTENSION: &str = "http://hl7.org/fhir/StructureDefinition/flag-priority";
/// Its code system.
pub const FLAG_PRIORITY_SYSTEM: &str = "http://hl7.org/fhir/flag-priority-code";
/// Allergy clinical status.
pub const ALLERGY_CLINICAL_SYSTEM: &str =
    "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical";
/// Allergy verification status.
pub const ALLERGY_VERIFICATION_SYSTEM: &str =
    "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification";
/// UK Core course of therapy.
pub const COURSE_OF_THERAPY_SYSTEM: &str =
    "https://fhir.hl7.org.uk/CodeSystem/UKCore-MedicationRequestCourseOfTherapy";
/// UK Core last issue date extension.
pub const LAST_ISSUE_EXTENSION: &str =
    "https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-MedicationStatementLastIssueDate";
/// UK Core prescribing organisation type extension.
pub const PRESCRIBING_ORG_EXTENSION: &str = "https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-MedicationPrescribingOrganizationType";
/// Its code system.
pub const PRESCRIBING_ORG_SYSTEM: &str =
    "https://fhir.hl7.org.uk/CodeSystem/UKCore-MedicationPrescribingOrganizationType";
/// HL7 v3 RoleCode (next of kin, power of attorney).
pub const ROLE_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-RoleCode";
/// HL7 v2 table 0131 (contact role).
pub const CONTACT_ROLE_V2: &str = "http://terminology.hl7.org/CodeSystem/v2-0131";
/// SNOMED CT "Allergies and adverse reactions" (the code of a List saying a source cannot
/// provide allergies).
pub const ALLERGY_LIST_CODE: &str = "886921000000105";
/// UCUM.
pub const UCUM: &str = "http://unitsofmeasure.org";

/// A UK Core profile URL.
pub fn uk_core(profile: &str) -> String {
    format!("https://fhir.hl7.org.uk/StructureDefinition/{profile}")
}

/// A protocol enum with a FHIR code in one system: the code and display to write, and the
/// value a code names when read.
pub trait FhirCode: Sized + Copy {
    /// The code system (empty for a FHIR `code` element with no system).
    const SYSTEM: &'static str;
    /// The code.
    fn code(self) -> &'static str;
    /// Its display.
    fn display(self) -> &'static str;
    /// The value a code names, if any.
    fn from_code(code: &str) -> Option<Self>;
}

macro_rules! fhir_code {
    ($ty:ty, $system:expr, { $($variant:path => ($code:literal, $display:literal)),+ $(,)? }) => {
        impl FhirCode for $ty {
            const SYSTEM: &'static str = $system;
            fn code(self) -> &'static str {
                match self { $($variant => $code),+ }
            }
            fn display(self) -> &'static str {
                match self { $($variant => $display),+ }
            }
            fn from_code(code: &str) -> Option<Self> {
                match code { $($code => Some($variant),)+ _ => None }
            }
        }
    };
}

fhir_code!(Sex, "http://hl7.org/fhir/administrative-gender", {
    Sex::Male => ("male", "Male"),
    Sex::Female => ("female", "Female"),
    Sex::Other => ("other", "Other"),
    Sex::Unknown => ("unknown", "Unknown"),
});

fhir_code!(AllergyVerification, ALLERGY_VERIFICATION_SYSTEM, {
    AllergyVerification::Unconfirmed => ("unconfirmed", "Unconfirmed"),
    AllergyVerification::Provisional => ("provisional", "Provisional"),
    AllergyVerification::Differential => ("differential", "Differential"),
    AllergyVerification::Confirmed => ("confirmed", "Confirmed"),
});

fhir_code!(AllergyStatus, ALLERGY_CLINICAL_SYSTEM, {
    AllergyStatus::Active => ("active", "Active"),
    AllergyStatus::Inactive => ("inactive", "Inactive"),
    AllergyStatus::Resolved => ("resolved", "Resolved"),
});

fhir_code!(AllergyCategory, "http://hl7.org/fhir/allergy-intolerance-category", {
    AllergyCategory::Food => ("food", "Food"),
    AllergyCategory::Medication => ("medication", "Medication"),
    AllergyCategory::Environment => ("environment", "Environment"),
    AllergyCategory::Biologic => ("biologic", "Biologic"),
});

fhir_code!(Criticality, "http://hl7.org/fhir/allergy-intolerance-criticality", {
    Criticality::Low => ("low", "Low Risk"),
    Criticality::High => ("high", "High Risk"),
    Criticality::UnableToAssess => ("unable-to-assess", "Unable to Assess Risk"),
});

fhir_code!(ReactionSeverity, "http://hl7.org/fhir/reaction-event-severity", {
    ReactionSeverity::Mild => ("mild", "Mild"),
    ReactionSeverity::Moderate => ("moderate", "Moderate"),
    ReactionSeverity::Severe => ("severe", "Severe"),
});

fhir_code!(MedicationStatus, "http://hl7.org/fhir/CodeSystem/medication-statement-status", {
    MedicationStatus::Active => ("active", "Active"),
    MedicationStatus::Completed => ("completed", "Completed"),
    MedicationStatus::Stopped => ("stopped", "Stopped"),
    MedicationStatus::OnHold => ("on-hold", "On Hold"),
    MedicationStatus::Intended => ("intended", "Intended"),
    MedicationStatus::Unknown => ("unknown", "Unknown"),
});

fhir_code!(Course, COURSE_OF_THERAPY_SYSTEM, {
    Course::Acute => ("acute", "Short course (acute) therapy"),
    Course::Repeat => ("continuous", "Continuous long term therapy"),
    Course::RepeatDispensing => ("continuous-repeating-dispensing", "Continuous long term (repeat dispensing)"),
});

fhir_code!(PeriodUnit, UCUM, {
    PeriodUnit::Second => ("s", "second"),
    PeriodUnit::Minute => ("min", "minute"),
    PeriodUnit::Hour => ("h", "hour"),
    PeriodUnit::Day => ("d", "day"),
    PeriodUnit::Week => ("wk", "week"),
    PeriodUnit::Month => ("mo", "month"),
    PeriodUnit::Year => ("a", "year"),
});

/// The core `flag-priority` code of an alert's severity: `PH`, `PM`, `PL`.
impl FhirCode for AlertSeverity {
    const SYSTEM: &'static str = FLAG_PRIORITY_SYSTEM;
    fn code(self) -> &'static str {
        match self {
            Self::HighRisk => "PH",
            Self::Warning => "PM",
            Self::Information => "PL",
        }
    }
    fn display(self) -> &'static str {
        match self {
            Self::HighRisk => "High priority",
            Self::Warning => "Medium priority",
            Self::Information => "Low priority",
        }
    }
    /// `PN` (no priority) reads as information. A missing or unknown priority is not
    /// read here: the source read shows such an alert as a warning, never as information.
    fn from_code(code: &str) -> Option<Self> {
        match code {
            "PH" => Some(Self::HighRisk),
            "PM" => Some(Self::Warning),
            "PL" | "PN" => Some(Self::Information),
            _ => None,
        }
    }
}

/// The text a course is written with beside its code (older exports carry only this).
pub fn course_text(c: Course) -> &'static str {
    match c {
        Course::Acute => "acute",
        Course::Repeat => "repeat",
        Course::RepeatDispensing => "repeat dispensing",
    }
}

/// A course from its text alone.
pub fn course_from_text(text: &str) -> Option<Course> {
    [Course::Acute, Course::Repeat, Course::RepeatDispensing]
        .into_iter()
        .find(|c| course_text(*c) == text)
}

/// An alert category: its words (written as `Flag.category.text`) and its flag-category
/// code.
pub fn alert_category(c: AlertCategory) -> (&'static str, &'static str) {
    match c {
        AlertCategory::CommunicationNeed => ("communication need", "contact"),
        AlertCategory::ReasonableAdjustment => ("reasonable adjustment", "contact"),
        AlertCategory::ClinicalWarning => ("clinical warning", "clinical"),
        AlertCategory::TreatmentRestriction => ("treatment restriction", "advance-directive"),
        AlertCategory::Safeguarding => ("safeguarding", "safety"),
        AlertCategory::EndOfLife => ("end of life", "advance-directive"),
        AlertCategory::Other => ("other", "admin"),
    }
}

/// The alert category a `Flag.category` says: its words if they name one, else the
/// flag-category code (which is coarser), else "other".
pub fn alert_category_from(text: Option<&str>, code: Option<&str>) -> AlertCategory {
    const ALL: [AlertCategory; 7] = [
        AlertCategory::CommunicationNeed,
        AlertCategory::ReasonableAdjustment,
        AlertCategory::ClinicalWarning,
        AlertCategory::TreatmentRestriction,
        AlertCategory::Safeguarding,
        AlertCategory::EndOfLife,
        AlertCategory::Other,
    ];
    if let Some(c) = text.and_then(|t| ALL.into_iter().find(|c| alert_category(*c).0 == t)) {
        return c;
    }
    match code {
        Some("contact") => AlertCategory::CommunicationNeed,
        Some("clinical" | "drug" | "diet" | "lab") => AlertCategory::ClinicalWarning,
        Some("advance-directive") => AlertCategory::EndOfLife,
        Some("safety" | "behavioral") => AlertCategory::Safeguarding,
        _ => AlertCategory::Other,
    }
}

/// The relationship coding (system, code) of a key contact's role.
pub fn contact_role(role: ContactRole) -> (&'static str, &'static str) {
    match role {
        ContactRole::NextOfKin => (ROLE_CODE, "NOK"),
        ContactRole::PowerOfAttorney => (ROLE_CODE, "POWATT"),
        ContactRole::Carer => (CONTACT_ROLE_V2, "C"),
        ContactRole::KeyWorker => (CONTACT_ROLE_V2, "CP"),
        ContactRole::Other => (CONTACT_ROLE_V2, "O"),
    }
}

/// The role a relationship's codes name (v3 RoleCode, v2 table 0131).
pub fn contact_role_from(role_code: Option<&str>, v2: Option<&str>) -> ContactRole {
    match (role_code, v2) {
        (Some("NOK"), _) | (_, Some("N")) => ContactRole::NextOfKin,
        (Some("POWATT"), _) => ContactRole::PowerOfAttorney,
        (_, Some("C")) => ContactRole::Carer,
        (_, Some("CP")) => ContactRole::KeyWorker,
        _ => ContactRole::Other,
    }
}

/// The prescribing-organisation code: (code, display).
pub fn prescribing_org(elsewhere: bool) -> (&'static str, &'static str) {
    if elsewhere {
        (
            "prescribed-by-another-organisation",
            "Prescribed by another organisation",
        )
    } else {
        ("prescribed-at-gp-practice", "Prescribed at GP practice")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trips<T: FhirCode + PartialEq + std::fmt::Debug>(all: &[T]) {
        for v in all {
            assert_eq!(T::from_code(v.code()), Some(*v), "{v:?}");
            assert!(!v.display().is_empty());
        }
        assert_eq!(T::from_code("not-a-code"), None);
    }

    #[test]
    fn every_table_reads_back_what_it_writes() {
        round_trips(&AllergyVerification::ALL);
        round_trips(&[Sex::Male, Sex::Female, Sex::Other, Sex::Unknown]);
        round_trips(&[
            AllergyStatus::Active,
            AllergyStatus::Inactive,
            AllergyStatus::Resolved,
        ]);
        round_trips(&[
            AllergyCategory::Food,
            AllergyCategory::Medication,
            AllergyCategory::Environment,
            AllergyCategory::Biologic,
        ]);
        round_trips(&[
            Criticality::Low,
            Criticality::High,
            Criticality::UnableToAssess,
        ]);
        round_trips(&[
            ReactionSeverity::Mild,
            ReactionSeverity::Moderate,
            ReactionSeverity::Severe,
        ]);
        round_trips(&[
            MedicationStatus::Active,
            MedicationStatus::Completed,
            MedicationStatus::Stopped,
            MedicationStatus::OnHold,
            MedicationStatus::Intended,
            MedicationStatus::Unknown,
        ]);
        round_trips(&[Course::Acute, Course::Repeat, Course::RepeatDispensing]);
        round_trips(&[
            PeriodUnit::Second,
            PeriodUnit::Minute,
            PeriodUnit::Hour,
            PeriodUnit::Day,
            PeriodUnit::Week,
            PeriodUnit::Month,
            PeriodUnit::Year,
        ]);
        round_trips(&[
            AlertSeverity::HighRisk,
            AlertSeverity::Warning,
            AlertSeverity::Information,
        ]);
        for c in [Course::Acute, Course::Repeat, Course::RepeatDispensing] {
            assert_eq!(course_from_text(course_text(c)), Some(c));
        }
        for r in [
            ContactRole::NextOfKin,
            ContactRole::PowerOfAttorney,
            ContactRole::Carer,
            ContactRole::KeyWorker,
            ContactRole::Other,
        ] {
            let (system, code) = contact_role(r);
            let read = if system == ROLE_CODE {
                contact_role_from(Some(code), None)
            } else {
                contact_role_from(None, Some(code))
            };
            assert_eq!(read, r);
        }
    }

    #[test]
    fn alert_categories_read_back_from_their_words() {
        for c in [
            AlertCategory::CommunicationNeed,
            AlertCategory::ReasonableAdjustment,
            AlertCategory::ClinicalWarning,
            AlertCategory::TreatmentRestriction,
            AlertCategory::Safeguarding,
            AlertCategory::EndOfLife,
            AlertCategory::Other,
        ] {
            let (text, code) = alert_category(c);
            assert_eq!(alert_category_from(Some(text), Some(code)), c);
        }
        // Code alone: the coarser reading.
        assert_eq!(
            alert_category_from(None, Some("advance-directive")),
            AlertCategory::EndOfLife
        );
        assert_eq!(alert_category_from(None, None), AlertCategory::Other);
    }
}
