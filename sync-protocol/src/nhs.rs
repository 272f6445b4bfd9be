//! The NHS number: ten digits, the last a Modulus 11 check digit.
//!
//! An [`NhsNumber`] can only hold a valid number. On the wire it is the number as an
//! unsigned varint (below 10^10, so leading zeros are kept by the fixed width of ten
//! digits); in text it is ten digits, displayed `3 3 4`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{FieldError, field_error};

/// A valid NHS number.
///
/// `Display` gives the `3 3 4` form for people (`943 476 5919`); [`NhsNumber::digits`]
/// the unformatted ten digits used in FHIR identifiers. `Debug` masks all but the last
/// four digits, so a number that reaches a log by accident does not identify anyone.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NhsNumber(u64);

const TEN_DIGITS: u64 = 10_000_000_000;

impl NhsNumber {
    /// Parse ten digits; spaces and hyphens between digits are ignored
    /// (`943 476 5919`, `943-476-5919`). Anything else is refused.
    pub fn parse(input: &str) -> Result<Self, FieldError> {
        let mut value: u64 = 0;
        let mut count = 0usize;
        for c in input.trim().chars() {
            match c {
                '0'..='9' => {
                    count += 1;
                    if count > 10 {
                        return Err(FieldError::NhsNumber);
                    }
                    value = value * 10 + u64::from(c as u8 - b'0');
                }
                ' ' | '-' if count > 0 => {}
                _ => return Err(FieldError::NhsNumber),
            }
        }
        if count != 10 || input.trim().ends_with([' ', '-']) {
            return Err(FieldError::NhsNumber);
        }
        Self::from_u64(value)
    }

    /// Accept a number given as an integer (the wire form). Must be below 10^10 and
    /// pass the check digit.
    pub fn from_u64(value: u64) -> Result<Self, FieldError> {
        if value >= TEN_DIGITS {
            return Err(FieldError::NhsNumber);
        }
        let digits = to_digits(value);
        match check_digit(&digits) {
            Some(check) if check == digits[9] => Ok(Self(value)),
            _ => Err(FieldError::NhsNumber),
        }
    }

    /// Complete a nine-digit stem with its check digit; `None` when the stem has none
    /// (its check value is 10). Used to generate test-range numbers.
    pub fn from_stem(stem: u32) -> Option<Self> {
        let stem = u64::from(stem);
        if stem >= TEN_DIGITS / 10 {
            return None;
        }
        let digits = to_digits(stem * 10);
        let check = check_digit(&digits)?;
        Some(Self(stem * 10 + u64::from(check)))
    }

    /// The number as an integer (below 10^10).
    pub fn as_u64(self) -> u64 {
        self.0
    }

    /// The ten digits, unformatted, as used in `https://fhir.nhs.uk/Id/nhs-number`.
    pub fn digits(self) -> String {
        format!("{:010}", self.0)
    }

    /// True for the range reserved for testing (999 000 0000 – 999 999 9999), which is
    /// never issued to a person.
    pub fn is_test_range(self) -> bool {
        self.0 >= 9_990_000_000
    }
}

fn to_digits(mut value: u64) -> [u8; 10] {
    let mut digits = [0u8; 10];
    for d in digits.iter_mut().rev() {
        // Cannot truncate: the remainder is below 10.
        *d = (value % 10) as u8;
        value /= 10;
    }
    digits
}

/// Modulus 11 check digit of the first nine digits: weights 10 down to 2, sum mod 11,
/// 11 − remainder; 11 gives 0 and 10 means the stem has no valid check digit.
fn check_digit(digits: &[u8; 10]) -> Option<u8> {
    let sum: u32 = digits
        .iter()
        .take(9)
        .zip((2..=10u32).rev())
        .map(|(&d, w)| u32::from(d) * w)
        .sum();
    match 11 - sum % 11 {
        11 => Some(0),
        10 => None,
        check => u8::try_from(check).ok(),
    }
}

/// The fuzzing and corpus-replay property of [`NhsNumber::parse`]: it accepts exactly
/// what a reference written separately from the NHS Data Dictionary rule accepts (after
/// trimming: ten ASCII digits, spaces or hyphens only between digits, Modulus 11 with
/// weights 10..2, remainder 10 invalid), and an accepted number round-trips through its
/// digits, its `3 3 4` display and its integer form. Panics when the property fails;
/// returns whether the input was accepted.
#[doc(hidden)]
#[allow(clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // Panicking is how this check reports a broken property; ten digits are checked before indexing.
pub fn check_parse(input: &str) -> bool {
    let parsed = NhsNumber::parse(input).ok();
    let t = input.trim();
    let chars_ok = t
        .chars()
        .all(|c| c.is_ascii_digit() || c == ' ' || c == '-');
    let ends_ok =
        t.starts_with(|c: char| c.is_ascii_digit()) && t.ends_with(|c: char| c.is_ascii_digit());
    let digits: Vec<u32> = t.chars().filter_map(|c| c.to_digit(10)).collect();
    let reference = chars_ok && ends_ok && digits.len() == 10 && {
        let sum: u32 = digits[..9]
            .iter()
            .zip([10, 9, 8, 7, 6, 5, 4, 3, 2])
            .map(|(d, w)| d * w)
            .sum();
        let check = (11 - sum % 11) % 11;
        check != 10 && check == digits[9]
    };
    match parsed {
        None => {
            assert!(!reference, "a valid NHS number was refused");
            false
        }
        Some(n) => {
            assert!(reference, "an invalid NHS number was accepted");
            let expected: String = digits
                .iter()
                .map(|d| char::from_digit(*d, 10).expect("a digit"))
                .collect();
            assert_eq!(n.digits(), expected, "accepted as another number");
            assert_eq!(
                NhsNumber::parse(&n.to_string()).ok(),
                Some(n),
                "display does not parse back"
            );
            assert_eq!(
                NhsNumber::from_u64(n.as_u64()).ok(),
                Some(n),
                "integer form does not round-trip"
            );
            true
        }
    }
}

impl FromStr for NhsNumber {
    type Err = FieldError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for NhsNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.digits();
        let (a, rest) = d.split_at(3);
        let (b, c) = rest.split_at(3);
        write!(f, "{a} {b} {c}")
    }
}

impl fmt::Debug for NhsNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NhsNumber(******{:04})", self.0 % 10_000)
    }
}

impl Serialize for NhsNumber {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for NhsNumber {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::from_u64(u64::deserialize(d)?).map_err(field_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_digit_eleven_becomes_zero() {
        // 9000000009: weights give sum 90, 90 mod 11 = 2, 11 - 2 = 9.
        assert!(NhsNumber::parse("9000000009").is_ok());
        // A stem whose remainder is 0 gets check digit 0.
        let n = (0..1000u32)
            .filter_map(|s| NhsNumber::from_stem(999_000_000 + s))
            .find(|n| n.as_u64() % 10 == 0)
            .expect("some test-range stem has check digit 0");
        assert!(NhsNumber::from_u64(n.as_u64()).is_ok());
    }

    #[test]
    fn rejects_separators_at_the_ends_and_other_characters() {
        for bad in [
            "-9434765919",
            "9434765919-",
            "94347659190",
            "943 476 5919 0",
            "943_476_5919",
            "943476591９",
        ] {
            assert_eq!(NhsNumber::parse(bad), Err(FieldError::NhsNumber), "{bad:?}");
        }
        assert!(NhsNumber::parse(" 943 476 5919 ").is_ok());
    }
}
