//! Primitive wire types. Each can only hold a valid value: constructors check the rule
//! and decoding goes through the same constructor.

use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{FieldError, Redacted, field_error};

/// Decode `$raw`, then build `$ty` with its `TryFrom<$raw>`; the one path from bytes
/// to a value, so decoding can never skip a check that construction makes.
macro_rules! deserialize_via {
    ($ty:ty, $raw:ty) => {
        impl<'de> ::serde::Deserialize<'de> for $ty {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = <$raw as ::serde::Deserialize>::deserialize(d)?;
                <$ty>::try_from(raw).map_err($crate::error::field_error)
            }
        }
    };
}
pub(crate) use deserialize_via;

/// Most elements a list preallocates for before any of them has been read. A hostile
/// length prefix can then cost no more than this much memory ahead of real input.
const PREALLOC_ITEMS: usize = 16;

/// A list of at most `N` items. On decode the limit is checked against the declared
/// length before any item is read, and memory grows only with items actually read.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct BoundedVec<T, const N: usize>(Vec<T>);

impl<T, const N: usize> BoundedVec<T, N> {
    /// The most items this list may hold.
    pub const MAX: usize = N;

    /// An empty list.
    pub fn new() -> Self {
        Self(Vec::new())
    }

    /// The items, as a `Vec`.
    pub fn into_inner(self) -> Vec<T> {
        self.0
    }

    /// Append an item, refusing past the limit.
    pub fn try_push(&mut self, item: T) -> Result<(), FieldError> {
        if self.0.len() >= N {
            return Err(too_many::<N>());
        }
        self.0.push(item);
        Ok(())
    }
}

fn too_many<const N: usize>() -> FieldError {
    FieldError::TooManyItems { max: N as u64 }
}

impl<T, const N: usize> Default for BoundedVec<T, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T, const N: usize> TryFrom<Vec<T>> for BoundedVec<T, N> {
    type Error = FieldError;
    fn try_from(v: Vec<T>) -> Result<Self, FieldError> {
        if v.len() > N {
            return Err(too_many::<N>());
        }
        Ok(Self(v))
    }
}

impl<T, const N: usize> Deref for BoundedVec<T, N> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.0
    }
}

impl<'a, T, const N: usize> IntoIterator for &'a BoundedVec<T, N> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl<T, const N: usize> IntoIterator for BoundedVec<T, N> {
    type Item = T;
    type IntoIter = std::vec::IntoIter<T>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<T: fmt::Debug, const N: usize> fmt::Debug for BoundedVec<T, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.0).finish()
    }
}

impl<T: Serialize, const N: usize> Serialize for BoundedVec<T, N> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for BoundedVec<T, N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T, const N: usize>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for V<T, N> {
            type Value = BoundedVec<T, N>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a list of at most {N} items")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let declared = seq.size_hint().unwrap_or(0);
                if declared > N {
                    return Err(field_error(too_many::<N>()));
                }
                let mut items = Vec::with_capacity(declared.min(PREALLOC_ITEMS));
                while let Some(item) = seq.next_element()? {
                    if items.len() == N {
                        return Err(field_error(too_many::<N>()));
                    }
                    items.push(item);
                }
                Ok(BoundedVec(items))
            }
        }
        d.deserialize_seq(V::<T, N>(PhantomData))
    }
}

/// At most `N` opaque bytes (certificates, CSRs, encoded audit records). `Debug` shows
/// only the length.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Bytes<const N: usize>(Vec<u8>);

impl<const N: usize> Bytes<N> {
    /// The most bytes this field may hold.
    pub const MAX: usize = N;

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }

    /// The bytes, as a `Vec`.
    pub fn into_inner(self) -> Vec<u8> {
        self.0
    }
}

impl<const N: usize> TryFrom<Vec<u8>> for Bytes<N> {
    type Error = FieldError;
    fn try_from(v: Vec<u8>) -> Result<Self, FieldError> {
        if v.len() > N {
            return Err(FieldError::Invalid("byte field over its length limit"));
        }
        Ok(Self(v))
    }
}

impl<const N: usize> fmt::Debug for Bytes<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bytes({} bytes)", self.0.len())
    }
}

impl<const N: usize> Serialize for Bytes<N> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de, const N: usize> Deserialize<'de> for Bytes<N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<const N: usize>;
        impl<'de, const N: usize> Visitor<'de> for V<N> {
            type Value = Bytes<N>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "at most {N} bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
                if v.len() > N {
                    return Err(field_error(FieldError::Invalid(
                        "byte field over its length limit",
                    )));
                }
                Ok(Bytes(v.to_vec()))
            }
        }
        d.deserialize_bytes(V::<N>)
    }
}

/// UTF-8 text of at most `N` bytes with no control characters other than tab and line
/// feed (so it cannot move a terminal cursor or forge a log line). Holds clinical or
/// personal text: `Debug` shows only the length.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Text<const N: usize>(String);

impl<const N: usize> Text<N> {
    /// The most bytes this field may hold.
    pub const MAX: usize = N;

    /// Check and wrap a string.
    pub fn new(s: impl Into<String>) -> Result<Self, FieldError> {
        let s = s.into();
        if s.len() > N {
            return Err(FieldError::Invalid("text over its length limit"));
        }
        if s.chars()
            .any(|c| (c.is_control() && c != '\n' && c != '\t') || c == '\u{FEFF}')
        {
            return Err(FieldError::Invalid("text with a control character"));
        }
        Ok(Self(s))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<const N: usize> Default for Text<N> {
    /// The empty text (always valid).
    fn default() -> Self {
        Self(String::new())
    }
}

impl<const N: usize> fmt::Debug for Text<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Redacted(self.0.len()).fmt(f)
    }
}

impl<const N: usize> Serialize for Text<N> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de, const N: usize> Deserialize<'de> for Text<N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<const N: usize>;
        impl<'de, const N: usize> Visitor<'de> for V<N> {
            type Value = Text<N>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "text of at most {N} bytes")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Text::new(v).map_err(field_error)
            }
        }
        d.deserialize_str(V::<N>)
    }
}

/// A non-negative decimal in its one canonical form (the shortest text that reads back
/// as the same `f64`: `2`, `0.5`, `12.75`), at most 24 characters. Used for structured
/// doses; the form is checked on decoding, so a value has one encoding. Since protocol
/// version 3.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Decimal(String);

/// A dose is clinical content: `Debug` does not show it.
impl fmt::Debug for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Decimal(..)")
    }
}

impl Decimal {
    /// The decimal of a finite, non-negative `f64`.
    pub fn from_f64(v: f64) -> Result<Self, FieldError> {
        if !v.is_finite() || v < 0.0 {
            return Err(FieldError::Invalid("decimal not finite and non-negative"));
        }
        Self::new(format!("{}", v + 0.0))
    }

    /// Check a decimal's text: canonical, finite, non-negative, at most 24 characters.
    pub fn new(s: impl Into<String>) -> Result<Self, FieldError> {
        let s = s.into();
        let canonical = s.len() <= 24
            && s.bytes().all(|b| b.is_ascii_digit() || b == b'.')
            && s.parse::<f64>()
                .is_ok_and(|v| v.is_finite() && format!("{v}") == s);
        if canonical {
            Ok(Self(s))
        } else {
            Err(FieldError::Invalid("decimal not in canonical form"))
        }
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The value.
    pub fn as_f64(&self) -> f64 {
        self.0.parse().unwrap_or(0.0)
    }
}

impl fmt::Display for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Decimal {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Decimal {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <&str>::deserialize(d)?;
        Self::new(s).map_err(field_error)
    }
}

/// Defines an ASCII identifier type: length range, allowed characters, and a name
/// used in error messages. These carry no patient data, so `Debug` shows the value.
macro_rules! ascii_id {
    ($(#[$doc:meta])* $name:ident, $min:expr, $max:expr, $allowed:expr, $what:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Check and wrap an identifier.
            pub fn new(s: impl Into<String>) -> Result<Self, FieldError> {
                let s = s.into();
                let allowed: fn(u8) -> bool = $allowed;
                if s.len() < $min || s.len() > $max || !s.bytes().all(allowed) {
                    return Err(FieldError::Invalid($what));
                }
                Ok(Self(s))
            }

            /// The identifier.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <&str>::deserialize(d)?;
                Self::new(s).map_err(field_error)
            }
        }
    };
}

fn id_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')
}

ascii_id!(
    /// An ODS organisation code (`https://fhir.nhs.uk/Id/ods-organization-code`):
    /// 3 to 10 upper-case letters and digits, e.g. `M85001`, `RYA`.
    OdsCode, 3, 10, |b| b.is_ascii_uppercase() || b.is_ascii_digit(), "ODS code"
);
ascii_id!(
    /// A member of staff: SDS user id or the trust's staff number; 1 to 32 of
    /// `A-Z a-z 0-9 - . _`.
    StaffId, 1, 32, id_char, "staff id"
);
ascii_id!(
    /// The upstream resource id of an item (FHIR `id`: 1 to 64 of `A-Z a-z 0-9 - .`).
    SourceId, 1, 64, |b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'), "source id"
);
ascii_id!(
    /// A device, as the hub names it; 1 to 64 of `A-Z a-z 0-9 - . _`.
    DeviceId, 1, 64, id_char, "device id"
);
ascii_id!(
    /// The outward part of a postcode up to the district, e.g. `WV10`, `B1`: 2 to 4
    /// upper-case letters and digits.
    PostcodeDistrict, 2, 4, |b| b.is_ascii_uppercase() || b.is_ascii_digit(), "postcode district"
);

/// The one-time enrolment token an administrator gives a device. A secret: `Debug`
/// shows nothing of it. 16 to 128 of `A-Z a-z 0-9 - _`.
#[derive(Clone, PartialEq, Eq)]
pub struct EnrolmentToken(String);

impl EnrolmentToken {
    /// Check and wrap a token.
    pub fn new(s: impl Into<String>) -> Result<Self, FieldError> {
        let s = s.into();
        let ok = (16..=128).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(FieldError::Invalid("enrolment token"));
        }
        Ok(Self(s))
    }

    /// The token.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for EnrolmentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EnrolmentToken(<secret>)")
    }
}

impl Serialize for EnrolmentToken {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for EnrolmentToken {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::new(<&str>::deserialize(d)?).map_err(field_error)
    }
}

/// A point in time: milliseconds since 1970-01-01T00:00:00Z, before year 10000.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize)]
pub struct Timestamp(u64);

#[cfg(feature = "rfc3339")]
impl Timestamp {
    /// As an RFC 3339 UTC instant (FHIR `instant`): milliseconds shown unless zero.
    pub fn rfc3339(self) -> String {
        let nanos = i128::from(self.0) * 1_000_000;
        time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
            .ok()
            .and_then(|d| {
                d.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_owned())
    }

    /// An RFC 3339 instant (with its offset), to the millisecond; `None` if it is not
    /// one or falls outside 1970–9999.
    pub fn from_rfc3339(s: &str) -> Option<Self> {
        let t =
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
        let ms = u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()?;
        Self::from_millis(ms).ok()
    }
}

impl Timestamp {
    /// As RFC 3339 UTC to the second (`2026-11-24T08:00:00Z`): how status, errors, the
    /// audit and the API write a time (no calendar crate: H. Hinnant's civil-from-days).
    pub fn utc_seconds(self) -> String {
        let secs = self.0 / 1000;
        let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX);
        let rem = secs % 86_400;
        let (y, m, d) = civil_from_days(days);
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60
        )
    }

    /// 10000-01-01T00:00:00Z in milliseconds; timestamps are below it.
    pub const END: u64 = 253_402_300_800_000;

    /// Wrap milliseconds since the epoch.
    pub fn from_millis(ms: u64) -> Result<Self, FieldError> {
        if ms >= Self::END {
            return Err(FieldError::Invalid("timestamp beyond year 9999"));
        }
        Ok(Self(ms))
    }

    /// Milliseconds since the epoch.
    pub fn as_millis(self) -> u64 {
        self.0
    }
}

impl TryFrom<u64> for Timestamp {
    type Error = FieldError;
    fn try_from(ms: u64) -> Result<Self, FieldError> {
        Self::from_millis(ms)
    }
}
deserialize_via!(Timestamp, u64);

/// A calendar date, possibly partial as FHIR allows (`1990`, `1990-05`, `1990-05-12`):
/// `month` 0 means month and day unknown, `day` 0 means day unknown.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Date {
    year: u16,
    month: u8,
    day: u8,
}

#[derive(Deserialize)]
struct RawDate {
    year: u16,
    month: u8,
    day: u8,
}

impl Date {
    /// A full date.
    pub fn ymd(year: u16, month: u8, day: u8) -> Result<Self, FieldError> {
        if day == 0 {
            return Err(FieldError::Invalid("date"));
        }
        Self::try_from(RawDate { year, month, day })
    }

    /// A date known to the month.
    pub fn ym(year: u16, month: u8) -> Result<Self, FieldError> {
        if month == 0 {
            return Err(FieldError::Invalid("date"));
        }
        Self::try_from(RawDate {
            year,
            month,
            day: 0,
        })
    }

    /// A date known to the year.
    pub fn year_only(year: u16) -> Result<Self, FieldError> {
        Self::try_from(RawDate {
            year,
            month: 0,
            day: 0,
        })
    }

    /// The year.
    pub fn year(self) -> u16 {
        self.year
    }

    /// The month (1–12), if known.
    pub fn month(self) -> Option<u8> {
        (self.month != 0).then_some(self.month)
    }

    /// The day of the month, if known.
    pub fn day(self) -> Option<u8> {
        (self.day != 0).then_some(self.day)
    }

    /// True when year, month and day are all known.
    pub fn is_full(self) -> bool {
        self.day != 0
    }
}

fn days_in_month(year: u16, month: u8) -> u8 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400) => {
            29
        }
        2 => 28,
        _ => 31,
    }
}

impl TryFrom<RawDate> for Date {
    type Error = FieldError;
    fn try_from(r: RawDate) -> Result<Self, FieldError> {
        let ok = (1800..=2200).contains(&r.year)
            && r.month <= 12
            && (r.month != 0 || r.day == 0)
            && (r.day == 0 || r.day <= days_in_month(r.year, r.month));
        if !ok {
            return Err(FieldError::Invalid("date"));
        }
        Ok(Self {
            year: r.year,
            month: r.month,
            day: r.day,
        })
    }
}
deserialize_via!(Date, RawDate);

/// FHIR date form: `YYYY`, `YYYY-MM` or `YYYY-MM-DD`.
impl fmt::Display for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}", self.year)?;
        if self.month != 0 {
            write!(f, "-{:02}", self.month)?;
        }
        if self.day != 0 {
            write!(f, "-{:02}", self.day)?;
        }
        Ok(())
    }
}

/// Dates can be birth dates: `Debug` does not show them.
impl fmt::Debug for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Date(<redacted>)")
    }
}

/// A SNOMED CT identifier (dm+d codes are SNOMED identifiers too): 6 to 18 digits, the
/// last a Verhoeff check digit.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct SctId(u64);

impl SctId {
    /// Check and wrap an identifier.
    pub fn new(id: u64) -> Result<Self, FieldError> {
        if !(100_000..1_000_000_000_000_000_000).contains(&id) || !verhoeff_valid(id) {
            return Err(FieldError::Invalid("SNOMED CT identifier"));
        }
        Ok(Self(id))
    }

    /// The identifier.
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl TryFrom<u64> for SctId {
    type Error = FieldError;
    fn try_from(id: u64) -> Result<Self, FieldError> {
        Self::new(id)
    }
}
deserialize_via!(SctId, u64);

impl fmt::Display for SctId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Debug for SctId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SctId({})", self.0)
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

const VERHOEFF_D: [[u8; 10]; 10] = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    [1, 2, 3, 4, 0, 6, 7, 8, 9, 5],
    [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
    [3, 4, 0, 1, 2, 8, 9, 5, 6, 7],
    [4, 0, 1, 2, 3, 9, 5, 6, 7, 8],
    [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
    [6, 5, 9, 8, 7, 1, 0, 4, 3, 2],
    [7, 6, 5, 9, 8, 2, 1, 0, 4, 3],
    [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
    [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
];

/// Row i is row 1 applied i times (p(i, j) = p(i-1, p(1, j))).
const VERHOEFF_P: [[u8; 10]; 8] = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    [1, 5, 7, 6, 2, 8, 3, 0, 9, 4],
    [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
    [8, 9, 1, 6, 0, 4, 3, 5, 2, 7],
    [9, 4, 5, 3, 1, 2, 6, 8, 7, 0],
    [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
    [2, 7, 9, 3, 8, 0, 6, 4, 1, 5],
    [7, 0, 4, 6, 9, 1, 3, 2, 5, 8],
];

/// Verhoeff check over all digits, least significant first.
fn verhoeff_valid(mut n: u64) -> bool {
    let mut c = 0u8;
    for row in VERHOEFF_P.iter().cycle() {
        if n == 0 {
            break;
        }
        // Both lookups are in range: a digit is below 10 and every table entry is too.
        let p = row.get((n % 10) as usize).copied().unwrap_or(0);
        c = VERHOEFF_D
            .get(usize::from(c))
            .and_then(|r| r.get(usize::from(p)))
            .copied()
            .unwrap_or(0);
        n /= 10;
    }
    c == 0
}

/// SNOMED CT's system URI.
pub const SNOMED_SYSTEM: &str = "http://snomed.info/sct";
/// dm+d's system URI (VTM, VMP, AMP, VMPP and AMPP codes: SCTIDs under their own system).
pub const DMD_SYSTEM: &str = "https://dmd.nhs.uk";
/// Read v2's system URI.
pub const READ_V2_SYSTEM: &str = "http://read.info/readv2";
/// CTV3's system URI.
pub const CTV3_SYSTEM: &str = "http://read.info/ctv3";

/// A code and the system it comes from, as the source recorded it. SNOMED CT and dm+d
/// codes are SCTIDs (checked); any other system keeps its URI and code as given.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Code {
    /// SNOMED CT (`http://snomed.info/sct`).
    Snomed(SctId),
    /// dm+d (`https://dmd.nhs.uk`).
    Dmd(SctId),
    /// Read v2 (`http://read.info/readv2`).
    ReadV2(Text<16>),
    /// CTV3 (`http://read.info/ctv3`).
    Ctv3(Text<16>),
    /// Any other code system, a local one included: its URI and the code.
    Other {
        /// The system URI as the source wrote it.
        system: Text<256>,
        /// The code.
        code: Text<64>,
    },
}

impl Code {
    /// The FHIR system URI.
    pub fn system(&self) -> &str {
        match self {
            Self::Snomed(_) => SNOMED_SYSTEM,
            Self::Dmd(_) => DMD_SYSTEM,
            Self::ReadV2(_) => READ_V2_SYSTEM,
            Self::Ctv3(_) => CTV3_SYSTEM,
            Self::Other { system, .. } => system.as_str(),
        }
    }

    /// The code as FHIR writes it.
    pub fn value(&self) -> String {
        match self {
            Self::Snomed(id) | Self::Dmd(id) => id.to_string(),
            Self::ReadV2(c) | Self::Ctv3(c) => c.as_str().to_owned(),
            Self::Other { code, .. } => code.as_str().to_owned(),
        }
    }

    /// The SCTID of a SNOMED CT or dm+d code (dm+d ids are SNOMED CT ids).
    pub fn sctid(&self) -> Option<SctId> {
        match self {
            Self::Snomed(id) | Self::Dmd(id) => Some(*id),
            Self::ReadV2(_) | Self::Ctv3(_) | Self::Other { .. } => None,
        }
    }

    /// A short name of the system for people: `SNOMED CT`, `dm+d`, `Read v2`, `CTV3`, or
    /// `local`.
    pub fn system_name(&self) -> &'static str {
        match self {
            Self::Snomed(_) => "SNOMED CT",
            Self::Dmd(_) => "dm+d",
            Self::ReadV2(_) => "Read v2",
            Self::Ctv3(_) => "CTV3",
            Self::Other { .. } => "local",
        }
    }
}

/// A concept as it was recorded: a code from some system with its display text, or text
/// alone (an item the source recorded without a code).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Coding {
    /// The code; `None` for a text-only item.
    pub code: Option<Code>,
    /// The display text as recorded upstream (the coding's display, else the concept's
    /// text).
    pub display: Text<512>,
}

impl Coding {
    /// A SNOMED CT concept.
    pub fn snomed(code: SctId, display: Text<512>) -> Self {
        Self {
            code: Some(Code::Snomed(code)),
            display,
        }
    }

    /// The SCTID, if the code is SNOMED CT or dm+d.
    pub fn sctid(&self) -> Option<SctId> {
        self.code.as_ref().and_then(Code::sctid)
    }
}

/// Where an item came from: the organisation that holds it, who recorded it, and when it
/// last changed — each as the source gave it, or absent. A missing part is never a reason
/// to drop an item.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Provenance {
    /// Source organisation (ODS code), when the source names one.
    pub organisation: Option<OdsCode>,
    /// Who recorded or asserted the item, as the source names them: a display name or a
    /// reference such as `Practitioner/…`, kept as given.
    pub recorded_by: Option<Text<256>>,
    /// When the source last updated the item, when it says.
    pub last_updated: Option<Timestamp>,
}

/// A position in the hub's change log, opaque to the device: it stores the token and
/// hands it back. Never a timestamp. 1 to 64 bytes.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Cursor(Bytes<64>);

impl Cursor {
    /// Wrap hub-chosen bytes.
    pub fn new(bytes: Vec<u8>) -> Result<Self, FieldError> {
        if bytes.is_empty() {
            return Err(FieldError::Invalid("empty cursor"));
        }
        Ok(Self(Bytes::try_from(bytes)?))
    }

    /// The token's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_slice()
    }
}

impl TryFrom<Bytes<64>> for Cursor {
    type Error = FieldError;
    fn try_from(b: Bytes<64>) -> Result<Self, FieldError> {
        Self::new(b.into_inner())
    }
}
deserialize_via!(Cursor, Bytes<64>);

impl Serialize for Cursor {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl fmt::Debug for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cursor(")?;
        for b in self.as_bytes() {
            write!(f, "{b:02x}")?;
        }
        f.write_str(")")
    }
}

/// Identifies a lease, as the hub numbers them.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct LeaseId(pub u64);

/// The hub change-log sequence at which a patient's record last changed.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct RecordVersion(pub u64);

/// A SHA-256 value (audit chain links, allowed-set digests).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct Hash32(pub [u8; 32]);

impl fmt::Debug for Hash32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Optional features a peer supports, as a bit set. Bits this version does not define
/// are ignored on receipt, so a newer peer may advertise more.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize, Default)]
pub struct Capabilities(pub u64);

impl Capabilities {
    /// zstd-compressed batches and audit pushes.
    pub const ZSTD: u64 = 1;

    /// Whether `bit` is set.
    pub fn has(self, bit: u64) -> bool {
        self.0 & bit == bit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_have_one_form() {
        assert_eq!(Decimal::from_f64(2.0).unwrap().as_str(), "2");
        assert_eq!(Decimal::from_f64(0.5).unwrap().as_str(), "0.5");
        assert_eq!(Decimal::from_f64(-0.0).unwrap().as_str(), "0");
        for bad in ["2.0", "02", ".5", "1e3", "-1", "NaN", "inf", ""] {
            assert!(Decimal::new(bad).is_err(), "{bad}");
        }
        assert!(Decimal::from_f64(f64::NAN).is_err());
        assert!(Decimal::from_f64(-1.0).is_err());
        assert_eq!(Decimal::new("12.75").unwrap().as_f64(), 12.75);
    }

    #[test]
    fn utc_seconds_is_rfc3339_to_the_second() {
        let t = |ms| Timestamp::from_millis(ms).unwrap().utc_seconds();
        assert_eq!(t(0), "1970-01-01T00:00:00Z");
        assert_eq!(t(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(t(1_735_689_599_999), "2024-12-31T23:59:59Z");
        assert_eq!(t(Timestamp::END - 1), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn verhoeff_accepts_real_sctids_and_rejects_a_changed_digit() {
        for id in [
            764146007u64,
            91936005,
            716186003,
            450476008,
            39732311000001104,
            196461000000101,
            836881000000105,
            315594003,
            73211009,
            22298006,
        ] {
            assert!(SctId::new(id).is_ok(), "{id}");
            assert!(SctId::new(id + 1).is_err(), "{}", id + 1);
        }
    }

    #[test]
    fn permutation_rows_are_powers_of_row_one() {
        for i in 2..8 {
            for j in 0..10 {
                let expected = VERHOEFF_P[i - 1][usize::from(VERHOEFF_P[1][j])];
                assert_eq!(VERHOEFF_P[i][j], expected, "p[{i}][{j}]");
            }
        }
    }

    #[test]
    fn dates_check_calendar_and_precision() {
        assert!(Date::ymd(2024, 2, 29).is_ok());
        assert!(Date::ymd(2023, 2, 29).is_err());
        assert!(Date::ymd(1900, 2, 29).is_err());
        assert!(Date::ymd(2000, 2, 29).is_ok());
        assert!(Date::ymd(2024, 13, 1).is_err());
        assert!(
            Date::try_from(RawDate {
                year: 2024,
                month: 0,
                day: 3
            })
            .is_err()
        );
        assert_eq!(Date::ym(1990, 5).unwrap().to_string(), "1990-05");
        assert_eq!(Date::year_only(1990).unwrap().to_string(), "1990");
        assert_eq!(Date::ymd(1990, 5, 2).unwrap().to_string(), "1990-05-02");
    }

    #[test]
    fn text_refuses_controls_and_length() {
        assert!(Text::<8>::new("a\tb\nc").is_ok());
        assert!(Text::<8>::new("a\rb").is_err());
        assert!(Text::<8>::new("\u{1b}[2J").is_err());
        assert!(Text::<8>::new("\u{85}").is_err());
        assert!(Text::<4>::new("héllo").is_err());
        assert_eq!(
            format!("{:?}", Text::<64>::new("Jane Smith").unwrap()),
            "<redacted 10 bytes>"
        );
    }

    #[test]
    fn ids_check_their_alphabet() {
        assert!(OdsCode::new("M85001").is_ok());
        assert!(OdsCode::new("m85001").is_err());
        assert!(OdsCode::new("M8").is_err());
        assert!(StaffId::new("").is_err());
        assert!(StaffId::new("nurse 1").is_err());
        assert!(EnrolmentToken::new("short").is_err());
        assert_eq!(
            format!(
                "{:?}",
                EnrolmentToken::new("abcdefghijklmnopqrstuvwxyz").unwrap()
            ),
            "EnrolmentToken(<secret>)"
        );
    }
}
