//! Structured dosage: FHIR `Dosage` to and from the protocol's, and in words for a
//! dosage the source coded but did not write out: "2 tablet, 3 times a day, oral, when
//! required".

use sync_protocol::record::{self, DoseQuantity, PeriodUnit};
use sync_protocol::types::{Decimal, Text};

use crate::codes::FhirCode;
use crate::model::{Dosage, DoseAndRate, Quantity, Timing, TimingRepeat};
use crate::{read, write};

/// The structure of a source's dosage, when it has any. `Err` names what could not be
/// read (the medication is then "could not be shown": a dose is not guessed).
pub fn read(d: &Dosage) -> Result<Option<record::Dosage>, &'static str> {
    let dose = d
        .dose_and_rate
        .iter()
        .find_map(|r| r.dose_quantity.as_ref())
        .map(|q| -> Result<DoseQuantity, &'static str> {
            Ok(DoseQuantity {
                value: Decimal::from_f64(q.value.ok_or("dose quantity without a value")?)
                    .map_err(|_| "dose quantity not a non-negative number")?,
                unit: q
                    .unit
                    .as_deref()
                    .or(q.code.as_deref())
                    .map(|u| Text::new(u).map_err(|_| "dose unit too long"))
                    .transpose()?,
            })
        })
        .transpose()?;
    let repeat = d.timing.as_ref().and_then(|t| t.repeat.as_ref());
    let frequency = repeat
        .and_then(|r| r.frequency)
        .map(|f| u16::try_from(f).map_err(|_| "dose frequency out of range"))
        .transpose()?;
    let period = repeat
        .and_then(|r| r.period)
        .map(|p| Decimal::from_f64(p).map_err(|_| "dose period not a non-negative number"))
        .transpose()?;
    let period_unit = repeat
        .and_then(|r| r.period_unit.as_deref())
        .map(|u| PeriodUnit::from_code(u).ok_or("dose period unit not in UCUM's units of time"))
        .transpose()?;
    let route = d
        .route
        .as_ref()
        .map(|r| read::concept(Some(r)))
        .transpose()?;
    let as_needed = d.as_needed_boolean == Some(true);
    let structured = dose.is_some()
        || frequency.is_some()
        || period.is_some()
        || period_unit.is_some()
        || route.is_some()
        || as_needed;
    Ok(structured.then_some(record::Dosage {
        dose,
        frequency,
        period,
        period_unit,
        route,
        as_needed,
    }))
}

/// The FHIR `Dosage` of a medication: its text and, when the source structured it, the
/// structure.
pub fn write(text: Option<&str>, d: Option<&record::Dosage>) -> Option<Dosage> {
    if text.is_none() && d.is_none() {
        return None;
    }
    let mut out = Dosage {
        text: text.map(str::to_owned),
        ..Dosage::default()
    };
    if let Some(d) = d {
        out.dose_and_rate = d
            .dose
            .iter()
            .map(|q| DoseAndRate {
                dose_quantity: Some(Quantity {
                    value: Some(q.value.as_f64()),
                    unit: q.unit.as_ref().map(|u| u.as_str().to_owned()),
                    system: None,
                    code: None,
                }),
            })
            .collect();
        if d.frequency.is_some() || d.period.is_some() || d.period_unit.is_some() {
            out.timing = Some(Timing {
                repeat: Some(TimingRepeat {
                    frequency: d.frequency.map(u32::from),
                    period: d.period.as_ref().map(Decimal::as_f64),
                    period_unit: d.period_unit.map(|u| u.code().to_owned()),
                }),
            });
        }
        out.route = d.route.as_ref().map(write::concept);
        out.as_needed_boolean = d.as_needed.then_some(true);
    }
    Some(out)
}

fn number(v: f64) -> String {
    // Whole doses without a decimal point; fractional ones as written (0.5, 2.5).
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

fn quantity(q: &Quantity) -> Option<String> {
    let v = number(q.value?);
    Some(match q.unit.as_deref().or(q.code.as_deref()) {
        Some(u) if !u.trim().is_empty() => format!("{v} {}", u.trim()),
        _ => v,
    })
}

fn unit_words(unit: &str) -> Option<(&'static str, &'static str)> {
    Some(match unit {
        "s" => ("second", "seconds"),
        "min" => ("minute", "minutes"),
        "h" => ("hour", "hours"),
        "d" => ("day", "days"),
        "wk" => ("week", "weeks"),
        "mo" => ("month", "months"),
        "a" => ("year", "years"),
        _ => return None,
    })
}

/// The dosage in words, or `None` if it holds nothing readable.
pub fn words(d: &Dosage) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(q) = d
        .dose_and_rate
        .iter()
        .find_map(|r| r.dose_quantity.as_ref())
        .and_then(quantity)
    {
        parts.push(q);
    }
    if let Some(r) = d.timing.as_ref().and_then(|t| t.repeat.as_ref()) {
        let unit = r.period_unit.as_deref().and_then(unit_words);
        let times = match r.frequency {
            Some(1) => Some("once".to_owned()),
            Some(2) => Some("twice".to_owned()),
            Some(n) => Some(format!("{n} times")),
            None => None,
        };
        match (times, r.period, unit) {
            (Some(t), Some(1.0), Some((one, _))) => parts.push(format!("{t} a {one}")),
            (Some(t), Some(p), Some((_, many))) => {
                parts.push(format!("{t} every {} {many}", number(p)));
            }
            (None, Some(1.0), Some((one, _))) => parts.push(format!("every {one}")),
            (None, Some(p), Some((_, many))) => parts.push(format!("every {} {many}", number(p))),
            (Some(t), _, _) => parts.push(t),
            _ => {}
        }
    }
    if let Some(route) = d.route.as_ref().and_then(|r| {
        r.text
            .as_deref()
            .or_else(|| r.coding.iter().find_map(|c| c.display.as_deref()))
    }) {
        parts.push(route.to_owned());
    }
    if d.as_needed_boolean == Some(true) {
        parts.push("when required".to_owned());
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CodeableConcept, DoseAndRate, Timing, TimingRepeat};

    #[test]
    fn structured_doses_read_as_a_prescriber_writes_them() {
        let d = Dosage {
            dose_and_rate: vec![DoseAndRate {
                dose_quantity: Some(Quantity {
                    value: Some(2.0),
                    unit: Some("tablet".into()),
                    ..Quantity::default()
                }),
            }],
            timing: Some(Timing {
                repeat: Some(TimingRepeat {
                    frequency: Some(3),
                    period: Some(1.0),
                    period_unit: Some("d".into()),
                }),
            }),
            route: Some(CodeableConcept::text("oral")),
            as_needed_boolean: Some(true),
            ..Dosage::default()
        };
        assert_eq!(
            words(&d).as_deref(),
            Some("2 tablet, 3 times a day, oral, when required")
        );
        let every = Dosage {
            dose_and_rate: vec![DoseAndRate {
                dose_quantity: Some(Quantity {
                    value: Some(0.5),
                    unit: Some("mL".into()),
                    ..Quantity::default()
                }),
            }],
            timing: Some(Timing {
                repeat: Some(TimingRepeat {
                    frequency: None,
                    period: Some(4.0),
                    period_unit: Some("h".into()),
                }),
            }),
            ..Dosage::default()
        };
        assert_eq!(words(&every).as_deref(), Some("0.5 mL, every 4 hours"));
        assert_eq!(words(&Dosage::default()), None);
    }
}
