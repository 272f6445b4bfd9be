//! NHS number checks against the rule in the NHS Data Dictionary (Modulus 11), with an
//! independent reference implementation written from the rule's text.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "test code: a panic is a failed test"
)]

use proptest::prelude::*;
use sync_protocol::NhsNumber;

/// The rule as written: weights 10..2 on digits 1-9, sum mod 11, 11 - remainder;
/// 11 gives 0, 10 means no valid number.
fn reference_check(stem: u32) -> Option<u32> {
    let mut sum = 0;
    let mut rest = stem;
    // Digit 9 (least significant of the stem) has weight 2, digit 1 weight 10.
    for weight in 2..=10 {
        sum += (rest % 10) * weight;
        rest /= 10;
    }
    match 11 - sum % 11 {
        11 => Some(0),
        10 => None,
        c => Some(c),
    }
}

#[test]
fn domain_examples() {
    for ok in [
        "9434765919",
        "9000000009",
        "9690937286",
        "9912003888",
        "9999999999",
    ] {
        assert!(NhsNumber::parse(ok).is_ok(), "{ok}");
    }
    assert!(NhsNumber::parse("4123456879").is_err());
}

#[test]
fn input_forms() {
    let n = NhsNumber::parse("943 476 5919").unwrap();
    assert_eq!(NhsNumber::parse("943-476-5919").unwrap(), n);
    assert_eq!(NhsNumber::parse("9434765919").unwrap(), n);
    assert_eq!(n.to_string(), "943 476 5919");
    assert_eq!(n.digits(), "9434765919");
    assert_eq!(format!("{n:?}"), "NhsNumber(******5919)");
    for bad in [
        "",
        "943476591",
        "94347659190",
        "943476591X",
        "+9434765919",
        "９４３４７６５９１９",
    ] {
        assert!(NhsNumber::parse(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn leading_zero_is_kept() {
    // Stems below 100 000 000 give numbers with leading zeros; digits() keeps them.
    let n = (0..100).find_map(NhsNumber::from_stem).unwrap();
    assert_eq!(n.digits().len(), 10);
    assert!(n.digits().starts_with("00000000"));
    assert_eq!(NhsNumber::parse(&n.digits()).unwrap(), n);
}

/// Every stem of the test range (one million), each with all ten final digits: exactly
/// the reference check digit is accepted, and none when the check value is 10.
/// `CARECACHE_NHS_EXHAUSTIVE=1` extends this to all 10^9 stems (about a minute in
/// release mode).
#[test]
fn every_stem_against_reference() {
    let first = if std::env::var_os("CARECACHE_NHS_EXHAUSTIVE").is_some() {
        0
    } else {
        999_000_000u32
    };
    let mut invalid_stems = 0u64;
    for stem in first..=999_999_999 {
        let expected = reference_check(stem);
        assert_eq!(
            NhsNumber::from_stem(stem).map(|n| (n.as_u64() % 10) as u32),
            expected,
            "{stem}"
        );
        match expected {
            // A stem with no check digit: none of its ten completions is valid.
            None => {
                invalid_stems += 1;
                for last in 0..10u64 {
                    assert!(
                        NhsNumber::from_u64(u64::from(stem) * 10 + last).is_err(),
                        "{stem}{last}"
                    );
                }
            }
            // Otherwise exactly the check digit is accepted.
            Some(check) => {
                for last in 0..10u32 {
                    let n = u64::from(stem) * 10 + u64::from(last);
                    assert_eq!(NhsNumber::from_u64(n).is_ok(), last == check, "{n}");
                }
            }
        }
    }
    // About one stem in eleven has no check digit.
    let stems = u64::from(1_000_000_000 - first);
    assert!(
        (stems / 12..stems / 10).contains(&invalid_stems),
        "{invalid_stems} of {stems}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// Over all 10^9 stems: a stem whose check value is 10 has no valid number at all.
    #[test]
    fn any_stem_matches_reference(stem in 0u32..1_000_000_000) {
        let expected = reference_check(stem);
        for last in 0..10u32 {
            let text = format!("{stem:09}{last}");
            prop_assert_eq!(NhsNumber::parse(&text).is_ok(), expected == Some(last));
        }
    }

    #[test]
    fn display_parses_back(stem in 0u32..1_000_000_000) {
        if let Some(n) = NhsNumber::from_stem(stem) {
            prop_assert_eq!(NhsNumber::parse(&n.to_string()), Ok(n));
            let debug = format!("{n:?}");
            prop_assert!(!debug.contains(&n.digits()[..6]));
        }
    }
}
