//! Deterministic synthetic UK patient records: test-range NHS numbers (999…), plausible
//! names and places, and the SNOMED CT and dm+d codes of the domain notes (§9). The
//! same seed always gives the same records. No real person is described.
#![forbid(unsafe_code)]

mod codes;
mod dataset;
pub mod fhir;

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sync_protocol::NhsNumber;
use sync_protocol::record::{
    Alert, Allergy, AllergyStatus, Course, Criticality, Demographics, HumanName, KeyContact,
    Medication, MedicationStatus, PatientRecord, Period, Reaction, ReactionSeverity, Section, Sex,
    Unreadable,
};
use sync_protocol::types::{
    BoundedVec, Coding, Date, OdsCode, PostcodeDistrict, Provenance, RecordVersion, SctId,
    SourceId, Text, Timestamp,
};

pub use codes::{ALERT_CODES, ALLERGY_CODES, MANIFESTATIONS, MEDICATION_CODES};
pub use dataset::{
    ConsentDate, ConsentStatus, Deleted, LOCAL_ALERT_SYSTEM, LaterWithdrawal, Objection, Provision,
    SENSITIVE_CODES, SENSITIVE_LABELS, SENSITIVE_LOCAL_CODE, SourcePatient,
    Unreadable as UnreadableItem, Withheld, delete_at_source, local_alert_code, local_code_map,
};

/// How many items of each kind a patient gets.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Alerts per patient (exact when `fixed`, else up to this many).
    pub alerts: usize,
    /// Allergies per patient.
    pub allergies: usize,
    /// Medications per patient.
    pub medications: usize,
    /// Use the counts exactly (benchmarks) rather than as maxima (realistic variety).
    pub fixed: bool,
}

impl Shape {
    /// 0–3 alerts, 0–4 allergies, 0–12 medications.
    pub const VARIED: Self = Self {
        alerts: 3,
        allergies: 4,
        medications: 12,
        fixed: false,
    };
}

/// A seeded record generator.
#[derive(Debug)]
pub struct Generator {
    rng: ChaCha8Rng,
    shape: Shape,
    next_stem: u32,
    version: u64,
}

impl Generator {
    /// A generator for `seed` with varied shapes.
    pub fn new(seed: u64) -> Self {
        Self::with_shape(seed, Shape::VARIED)
    }

    /// A generator for `seed` with the given shape.
    pub fn with_shape(seed: u64, shape: Shape) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let next_stem = 999_000_000 + rng.random_range(0..100_000);
        Self {
            rng,
            shape,
            next_stem,
            version: 0,
        }
    }

    /// The next test-range NHS number (skipping stems with no check digit).
    pub fn next_nhs_number(&mut self) -> NhsNumber {
        loop {
            let stem = self.next_stem;
            self.next_stem = if stem >= 999_999_999 {
                999_000_000
            } else {
                stem + 1
            };
            if let Some(n) = NhsNumber::from_stem(stem) {
                return n;
            }
        }
    }

    /// The next patient.
    pub fn patient(&mut self) -> PatientRecord {
        self.version += 1;
        let nhs_number = self.next_nhs_number();
        let demographics = self.demographics();
        let n_alerts = self.count(self.shape.alerts);
        let n_allergies = self.count(self.shape.allergies);
        let n_meds = self.count(self.shape.medications);
        let alerts = (0..n_alerts).map(|i| self.alert(i)).collect();
        let allergies = (0..n_allergies).map(|i| self.allergy(i)).collect();
        let medications = (0..n_meds).map(|i| self.medication(i)).collect();
        let contacts = (0..self.rng.random_range(0..=2))
            .map(|_| self.contact())
            .collect();
        PatientRecord {
            nhs_number,
            version: RecordVersion(self.version),
            demographics,
            alerts: section(alerts),
            // One in twenty sources does not share allergies: "not available", never
            // "none".
            allergies: if self.rng.random_ratio(1, 20) && !self.shape.fixed {
                Section::NotAvailable
            } else {
                section(allergies)
            },
            medications: section(medications),
            contacts: section(contacts),
            withheld: if self.rng.random_ratio(1, 25) {
                self.rng.random_range(1..=2)
            } else {
                0
            },
            unreadable: Unreadable::default(),
        }
    }

    /// `n` patients.
    pub fn patients(&mut self, n: usize) -> Vec<PatientRecord> {
        (0..n).map(|_| self.patient()).collect()
    }

    fn count(&mut self, max: usize) -> usize {
        if self.shape.fixed {
            max
        } else {
            self.rng.random_range(0..=max)
        }
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        // Every table passed here is a non-empty constant.
        *items
            .choose(&mut self.rng)
            .unwrap_or_else(|| unreachable!("empty code table"))
    }

    fn demographics(&mut self) -> Demographics {
        let female = self.rng.random_bool(0.5);
        let given = self.pick(if female {
            codes::GIVEN_F
        } else {
            codes::GIVEN_M
        });
        let family = self.pick(codes::FAMILY);
        let restricted = self.rng.random_ratio(1, 200);
        let name = HumanName {
            family: text(family),
            given: text(given),
            prefix: Some(text(if female { "Ms" } else { "Mr" })),
        };
        let birth_date = self.date(1925, 2020);
        let sex = if female { Sex::Female } else { Sex::Male };
        let (postcode, gp) = if restricted {
            (None, None)
        } else {
            (
                Some(self.pick(codes::POSTCODE_DISTRICTS)),
                Some(self.pick(codes::GP_PRACTICES)),
            )
        };
        Demographics::new(
            name,
            birth_date,
            sex,
            postcode.map(|p| PostcodeDistrict::new(p).unwrap_or_else(|_| unreachable!("table"))),
            gp.map(ods),
            restricted,
        )
        .unwrap_or_else(|_| unreachable!("location is absent exactly when restricted"))
    }

    fn date(&mut self, from: u16, to: u16) -> Date {
        let y = self.rng.random_range(from..=to);
        let m = self.rng.random_range(1..=12);
        let d = self.rng.random_range(1..=28);
        Date::ymd(y, m, d).unwrap_or_else(|_| unreachable!("day 1-28 exists in every month"))
    }

    fn provenance(&mut self) -> Provenance {
        let org = self.pick(codes::GP_PRACTICES);
        let ms = 1_700_000_000_000 + self.rng.random_range(0..40_000_000_000u64);
        Provenance {
            organisation: Some(ods(org)),
            recorded_by: None,
            last_updated: Some(
                Timestamp::from_millis(ms).unwrap_or_else(|_| unreachable!("2023-2025")),
            ),
        }
    }

    fn source_id(&mut self, kind: &str, i: usize) -> SourceId {
        let id = format!("{kind}-{:08x}-{i}", self.rng.random::<u32>());
        SourceId::new(id).unwrap_or_else(|_| unreachable!("ASCII id under 64 bytes"))
    }

    fn alert(&mut self, i: usize) -> Alert {
        let (code, display, category, severity, detail) = self.pick(ALERT_CODES);
        Alert {
            source_id: self.source_id("flag", i),
            category,
            code: coding(code, display),
            detail: detail.map(text),
            period: Period::new(Some(self.date(2015, 2024)), None)
                .unwrap_or_else(|_| unreachable!("open-ended")),
            severity,
            provenance: self.provenance(),
        }
    }

    fn allergy(&mut self, i: usize) -> Allergy {
        let (code, display, category) = self.pick(ALLERGY_CODES);
        let (mcode, mdisplay) = self.pick(MANIFESTATIONS);
        let severity = self.pick(&[
            ReactionSeverity::Mild,
            ReactionSeverity::Moderate,
            ReactionSeverity::Severe,
        ]);
        let reactions = if self.rng.random_ratio(1, 6) {
            Vec::new()
        } else {
            vec![Reaction {
                manifestation: Some(coding(mcode, mdisplay)),
                description: None,
                severity: Some(severity),
            }]
        };
        Allergy {
            source_id: self.source_id("alg", i),
            substance: coding(code, display),
            category: Some(category),
            criticality: Some(self.pick(&[
                Criticality::Low,
                Criticality::High,
                Criticality::UnableToAssess,
            ])),
            status: if self.rng.random_ratio(1, 10) {
                AllergyStatus::Resolved
            } else {
                AllergyStatus::Active
            },
            reactions: BoundedVec::try_from(reactions).unwrap_or_default(),
            onset: Some(
                Date::year_only(self.rng.random_range(1960..=2023))
                    .unwrap_or_else(|_| unreachable!("year")),
            ),
            note: None,
            provenance: self.provenance(),
            // Set by the source-record path (`fieldify`), so the plain records and their
            // random sequence stay as they were (the store-v1 fixture is rebuilt from them).
            verification: None,
        }
    }

    fn medication(&mut self, i: usize) -> Medication {
        let (code, display, dose) = self.pick(MEDICATION_CODES);
        let repeat = self.rng.random_ratio(2, 3);
        Medication {
            source_id: self.source_id("med", i),
            medicine: coding(code, display),
            dose_text: Some(text(dose)),
            status: MedicationStatus::Active,
            course: Some(if repeat {
                Course::Repeat
            } else {
                Course::Acute
            }),
            started: Some(self.date(2018, 2024)),
            last_issued: Some(self.date(2024, 2025)),
            prescribed_elsewhere: self.rng.random_ratio(1, 12),
            provenance: self.provenance(),
            // Set by the source-record path (`fieldify`), as `verification` above.
            ended: None,
            dosage: None,
        }
    }

    fn contact(&mut self) -> KeyContact {
        let (role, relationship) = self.pick(codes::CONTACT_ROLES);
        let given = self.pick(codes::GIVEN_F);
        let family = self.pick(codes::FAMILY);
        let phone = format!("07700 900{:03}", self.rng.random_range(0..1000));
        KeyContact {
            role,
            name: text(&format!("{given} {family}")),
            relationship: Some(text(relationship)),
            phone: Some(text(&phone)),
            provenance: self.provenance(),
        }
    }
}

fn section<T, const N: usize>(items: Vec<T>) -> Section<T, N> {
    Section::from_items(items).unwrap_or(Section::NotAvailable)
}

fn text<const N: usize>(s: &str) -> Text<N> {
    Text::new(s).unwrap_or_else(|_| unreachable!("code-table text is short and printable"))
}

fn ods(code: &str) -> OdsCode {
    OdsCode::new(code).unwrap_or_else(|_| unreachable!("code-table ODS code"))
}

fn coding(code: u64, display: &str) -> Coding {
    Coding::snomed(
        SctId::new(code).unwrap_or_else(|_| unreachable!("code tables are checked by a test")),
        text(display),
    )
}

/// A timestamp the generator made (2023–2025), for places that need one.
fn stamp(p: &Provenance) -> Timestamp {
    p.last_updated.unwrap_or_else(|| {
        Timestamp::from_millis(1_700_000_000_000).unwrap_or_else(|_| unreachable!())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_test_range() {
        let a = Generator::new(7).patients(50);
        let b = Generator::new(7).patients(50);
        assert_eq!(a, b);
        assert!(a.iter().all(|p| p.nhs_number.is_test_range()));
        assert_ne!(a, Generator::new(8).patients(50));
    }

    #[test]
    fn every_table_code_is_a_valid_sctid() {
        let codes = ALERT_CODES
            .iter()
            .map(|c| c.0)
            .chain(ALLERGY_CODES.iter().map(|c| c.0))
            .chain(MANIFESTATIONS.iter().map(|c| c.0))
            .chain(MEDICATION_CODES.iter().map(|c| c.0));
        for code in codes {
            assert!(SctId::new(code).is_ok(), "{code}");
        }
    }

    #[test]
    fn fixed_shape_gives_exact_counts() {
        let shape = Shape {
            alerts: 2,
            allergies: 3,
            medications: 8,
            fixed: true,
        };
        for p in Generator::with_shape(1, shape).patients(20) {
            assert_eq!(p.alerts.entries().len(), 2);
            assert_eq!(p.allergies.entries().len(), 3);
            assert_eq!(p.medications.entries().len(), 8);
        }
    }
}
