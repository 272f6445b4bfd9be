//! Finding the patient in front of a crew without an NHS number: by family and given
//! name, date of birth, gender and postcode, among the patients held on this device.
//!
//! Matching is tolerant the way the national demographics service is: names are
//! normalised (case, accents, hyphens, apostrophes, spaces, "Mac"/"Mc"), compared exactly,
//! by prefix and by edit distance (Jaro-Winkler, for the misspelling a relative spells
//! out at a door); a date of birth matches exactly, with day and month swapped, or by
//! year alone where the record holds only a year; a postcode matches by its district
//! (the device holds no more). Every match says why, and a score ranks them.
//!
//! A search needs at least two of name, date of birth and postcode, and a patient is a
//! match only on at least two of them, so a search cannot list the region. Which of the
//! matches a caller may see is decided afterwards, patient by patient, by the same policy
//! as a read (`api`), and only those are shown.
//!
//! The index lives in memory only, built from the sealed records on first use and
//! rebuilt after any commit (a purged patient is gone from the next search); its text is
//! zeroized when dropped. Nothing of it is written to disk, logged or put in `Debug`.

use std::collections::HashSet;

use sync_protocol::NhsNumber;
use sync_protocol::record::{Demographics, PatientRecord, Sex};
use sync_protocol::types::Date;
use unicode_normalization::UnicodeNormalization;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Most results one search returns.
pub const MAX_RESULTS: usize = 20;

/// A name compared by edit distance matches at this Jaro-Winkler similarity or above.
const NAME_SIMILARITY: f64 = 0.88;

/// What a search asks for. Build it with [`Query::new`].
#[derive(Clone, Default)]
pub struct Query {
    family: Option<String>,
    given: Option<String>,
    birth: Option<QueryDate>,
    sex: Option<Sex>,
    district: Option<String>,
}

/// The terms are what a caller typed about a patient: `Debug` shows only which are set.
impl std::fmt::Debug for Query {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Query")
            .field("family", &self.family.is_some())
            .field("given", &self.given.is_some())
            .field("birth", &self.birth.is_some())
            .field("sex", &self.sex.is_some())
            .field("postcode", &self.district.is_some())
            .finish()
    }
}

impl Drop for Query {
    fn drop(&mut self) {
        self.family.zeroize();
        self.given.zeroize();
        self.district.zeroize();
    }
}

/// A date of birth as typed: `1950-03-07` (the usual `YYYY-MM-DD`), `07/03/1950` (UK
/// order), or a year.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct QueryDate {
    year: u16,
    month: Option<u8>,
    day: Option<u8>,
}

/// Why a query was refused. Names the rule, never the terms.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum QueryError {
    /// Fewer than two of name, date of birth and postcode.
    #[error(
        "give at least two of: name (family and/or given), date of birth, postcode — a search cannot list the region"
    )]
    TooBroad,
    /// A date of birth that is not a date.
    #[error("date of birth must be YYYY-MM-DD, DD/MM/YYYY or a year")]
    BadDate,
    /// A gender outside male, female, other, unknown.
    #[error("gender must be male, female, other or unknown")]
    BadGender,
    /// A postcode that is not one.
    #[error("postcode must be a UK postcode or its outward part, e.g. WV10 9QR or WV10")]
    BadPostcode,
    /// A term longer than any name.
    #[error("a search term is too long")]
    TooLong,
}

impl Query {
    /// A query from the terms a caller gave (empty terms are absent).
    pub fn new(
        family: Option<&str>,
        given: Option<&str>,
        birth_date: Option<&str>,
        gender: Option<&str>,
        postcode: Option<&str>,
    ) -> Result<Self, QueryError> {
        let term = |t: Option<&str>| -> Result<Option<String>, QueryError> {
            match t.map(str::trim).filter(|t| !t.is_empty()) {
                Some(t) if t.chars().count() > 128 => Err(QueryError::TooLong),
                Some(t) => Ok(Some(normalise(t)).filter(|n| !n.is_empty())),
                None => Ok(None),
            }
        };
        let family = term(family)?;
        let given = term(given)?;
        let birth = birth_date
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(parse_date)
            .transpose()?;
        let sex = match gender.map(|g| g.trim().to_ascii_lowercase()).as_deref() {
            None | Some("") => None,
            Some("male" | "m") => Some(Sex::Male),
            Some("female" | "f") => Some(Sex::Female),
            Some("other") => Some(Sex::Other),
            Some("unknown") => Some(Sex::Unknown),
            Some(_) => return Err(QueryError::BadGender),
        };
        let district = postcode
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(district_of)
            .transpose()?;
        let q = Self {
            family,
            given,
            birth,
            sex,
            district,
        };
        let criteria = usize::from(q.family.is_some() || q.given.is_some())
            + usize::from(q.birth.is_some())
            + usize::from(q.district.is_some());
        if criteria < 2 {
            return Err(QueryError::TooBroad);
        }
        Ok(q)
    }
}

fn parse_date(s: &str) -> Result<QueryDate, QueryError> {
    let num = |p: &str| p.parse::<u16>().map_err(|_| QueryError::BadDate);
    let parts: Vec<&str> = s.split(['-', '/', '.']).collect();
    let (year, month, day) = match parts.as_slice() {
        [y] if y.len() == 4 => (num(y)?, None, None),
        [y, m, d] if y.len() == 4 => (num(y)?, Some(num(m)?), Some(num(d)?)),
        [d, m, y] if y.len() == 4 => (num(y)?, Some(num(m)?), Some(num(d)?)),
        _ => return Err(QueryError::BadDate),
    };
    let narrow = |v: Option<u16>| -> Result<Option<u8>, QueryError> {
        v.map(|v| u8::try_from(v).map_err(|_| QueryError::BadDate))
            .transpose()
    };
    let (month, day) = (narrow(month)?, narrow(day)?);
    // Day and month are checked only loosely: a swapped date is still searched for.
    if !(1800..=2200).contains(&year)
        || month.is_some_and(|m| m == 0 || m > 31)
        || day.is_some_and(|d| d == 0 || d > 31)
    {
        return Err(QueryError::BadDate);
    }
    Ok(QueryDate { year, month, day })
}

/// The district (outward code) of a full or partial postcode: `wv10 9qr` → `WV10`.
fn district_of(s: &str) -> Result<String, QueryError> {
    let compact: String = s
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_uppercase();
    if !(2..=8).contains(&compact.len()) || !compact.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(QueryError::BadPostcode);
    }
    // A full postcode ends in its three-character inward code (digit, letter, letter).
    let outward = if compact.len() >= 5 {
        let (out, inward) = compact.split_at(compact.len() - 3);
        let b = inward.as_bytes();
        if b.first().is_some_and(u8::is_ascii_digit)
            && b.get(1..)
                .is_some_and(|r| r.iter().all(u8::is_ascii_alphabetic))
        {
            out.to_owned()
        } else {
            compact
        }
    } else {
        compact
    };
    if !(2..=4).contains(&outward.len()) {
        return Err(QueryError::BadPostcode);
    }
    Ok(outward)
}

/// A name as compared: lower case, accents removed, apostrophes dropped, hyphens and
/// other separators as spaces, runs of spaces as one, and "mac" at the start of a word
/// written "mc".
pub fn normalise(s: &str) -> String {
    let folded: String = s
        .nfd()
        .filter(|c| !unicode_normalization::char::is_combining_mark(*c))
        .flat_map(char::to_lowercase)
        .filter(|c| !matches!(c, '\'' | '’' | '`' | '.'))
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect();
    folded
        .split_whitespace()
        .map(|w| match w.strip_prefix("mac") {
            Some(rest) if rest.len() >= 3 => format!("mc{rest}"),
            _ => w.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// One held patient as the index keeps them.
#[derive(Zeroize, ZeroizeOnDrop)]
struct Entry {
    #[zeroize(skip)]
    nhs: NhsNumber,
    family: String,
    given: Vec<String>,
    #[zeroize(skip)]
    birth: Date,
    #[zeroize(skip)]
    sex: Sex,
    district: String,
}

impl Entry {
    fn of(nhs: NhsNumber, d: &Demographics) -> Self {
        Self {
            nhs,
            family: normalise(d.name.family.as_str()),
            given: normalise(d.name.given.as_str())
                .split(' ')
                .filter(|w| !w.is_empty())
                .map(str::to_owned)
                .collect(),
            birth: d.birth_date,
            sex: d.sex,
            district: d
                .postcode_district
                .as_ref()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_default(),
        }
    }
}

/// How well one typed name matches one held name, and in what way.
fn name_match(typed: &str, held: &str) -> Option<(f64, How)> {
    if typed.is_empty() || held.is_empty() {
        return None;
    }
    if typed == held {
        return Some((1.0, How::Exact));
    }
    // Compare without spaces too: "Mc Donald" and "McDonald", "Smith Jones" and
    // "Smith-Jones".
    let t: String = typed.split(' ').collect();
    let h: String = held.split(' ').collect();
    if t == h {
        return Some((0.98, How::Exact));
    }
    if held.split(' ').any(|w| w == typed) || typed.split(' ').any(|w| w == held) {
        return Some((0.9, How::Part));
    }
    let similarity = strsim::jaro_winkler(&t, &h);
    if similarity >= NAME_SIMILARITY {
        return Some((similarity * 0.9, How::Similar));
    }
    // One slip of the pen in a short name (Shaw / Shew), two in a long one: Jaro-Winkler
    // marks short names down for one changed letter. Only near names pay for the count.
    if similarity >= 0.7 {
        let allowed = match t.chars().count() {
            0..=3 => 0,
            4..=7 => 1,
            _ => 2,
        };
        if allowed > 0 && strsim::damerau_levenshtein(&t, &h) <= allowed {
            return Some((0.8, How::Similar));
        }
    }
    if t.len() >= 3 && h.starts_with(&t) {
        return Some((0.7, How::Prefix));
    }
    None
}

fn birth_match(q: QueryDate, held: Date) -> Option<(f64, &'static str)> {
    if q.year != held.year() {
        return None;
    }
    match (q.month, q.day, held.month(), held.day()) {
        (Some(m), Some(d), Some(hm), Some(hd)) if m == hm && d == hd => {
            Some((1.0, "date of birth"))
        }
        (Some(m), Some(d), Some(hm), Some(hd)) if m == hd && d == hm => {
            Some((0.8, "date of birth with day and month swapped"))
        }
        (None, _, _, _) => Some((0.6, "year of birth")),
        (Some(m), _, Some(hm), None) if m == hm => {
            Some((0.6, "month and year of birth (the record holds no day)"))
        }
        (Some(_), _, None, _) => Some((0.5, "year of birth (the record holds no more)")),
        _ => None,
    }
}

/// One match: who, how well (0–1) and why.
#[derive(Clone)]
pub struct Match {
    /// The patient.
    pub nhs: NhsNumber,
    /// 0 to 1; 1 is every term given matched exactly.
    pub score: f64,
    /// Why, in words ("family name similar spelling; date of birth; postcode district").
    pub reasons: Vec<&'static str>,
}

impl std::fmt::Debug for Match {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Match")
            .field("nhs", &self.nhs)
            .field("score", &self.score)
            .finish_non_exhaustive()
    }
}

fn score(q: &Query, e: &Entry) -> Option<Match> {
    let mut reasons = Vec::new();
    let mut total = 0.0;
    let mut asked = 0.0;
    let mut criteria = 0;
    // Name: family and given together count as one criterion.
    if q.family.is_some() || q.given.is_some() {
        let mut name_score = 0.0;
        let mut parts = 0.0;
        if let Some(f) = &q.family {
            parts += 1.0;
            if let Some((s, why)) = name_match(f, &e.family) {
                name_score += s;
                reasons.push(why.reason(true));
            }
        }
        if let Some(g) = &q.given {
            parts += 1.0;
            let best = g.split(' ').next().and_then(|first| {
                e.given
                    .iter()
                    .filter_map(|held| name_match(first, held))
                    .max_by(|a, b| a.0.total_cmp(&b.0))
            });
            if let Some((s, why)) = best {
                name_score += s;
                reasons.push(why.reason(false));
            }
        }
        asked += 1.0;
        if name_score > 0.0 {
            criteria += 1;
            total += name_score / parts;
        }
    }
    if let Some(b) = q.birth {
        asked += 1.0;
        if let Some((s, why)) = birth_match(b, e.birth) {
            criteria += 1;
            total += s;
            reasons.push(why);
        }
    }
    if let Some(d) = &q.district {
        asked += 1.0;
        if !e.district.is_empty() && *d == e.district {
            criteria += 1;
            total += 1.0;
            reasons.push("postcode district");
        }
    }
    if criteria < 2 {
        return None;
    }
    let mut score = total / asked;
    if let Some(s) = q.sex {
        if s == e.sex {
            reasons.push("gender");
        } else if e.sex != Sex::Unknown && s != Sex::Unknown {
            score *= 0.7;
            reasons.push("GENDER DIFFERS");
        }
    }
    Some(Match {
        nhs: e.nhs,
        score: (score * 1000.0).round() / 1000.0,
        reasons,
    })
}

/// How a typed name matched a held one.
#[derive(Clone, Copy)]
enum How {
    Exact,
    Part,
    Similar,
    Prefix,
}

impl How {
    /// The reason shown, for a family (`true`) or given name.
    fn reason(self, family: bool) -> &'static str {
        match (self, family) {
            (Self::Exact, true) => "family name",
            (Self::Part, true) => "family name (one part of a double name)",
            (Self::Similar, true) => "family name (similar spelling)",
            (Self::Prefix, true) => "family name (starts with what was typed)",
            (Self::Exact, false) => "given name",
            (Self::Part, false) => "given name (one part)",
            (Self::Similar, false) => "given name (similar spelling)",
            (Self::Prefix, false) => "given name (starts with what was typed)",
        }
    }
}

/// The held patients' demographics, as searched.
#[derive(Default)]
pub struct Index {
    entries: Vec<Entry>,
    /// The store generation it was built from.
    generation: Option<u64>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("patients", &self.entries.len())
            .finish()
    }
}

impl Index {
    /// An index of `records`.
    pub fn build<'a>(records: impl IntoIterator<Item = &'a PatientRecord>) -> Self {
        let mut seen = HashSet::new();
        let entries = records
            .into_iter()
            .filter(|r| seen.insert(r.nhs_number))
            .map(|r| Entry::of(r.nhs_number, &r.demographics))
            .collect();
        Self {
            entries,
            generation: None,
        }
    }

    /// An index of every record the store holds, read one record at a time (the store's
    /// records are never all in memory at once), marked with the store generation read
    /// before it.
    pub fn from_store(store: &crate::store::Store) -> Result<Self, crate::store::StoreError> {
        let generation = store.generation();
        let mut entries = Vec::new();
        let mut seen = HashSet::new();
        store.for_each_record_decoded(|r| {
            if seen.insert(r.nhs_number) {
                entries.push(Entry::of(r.nhs_number, &r.demographics));
            }
        })?;
        entries.shrink_to_fit();
        Ok(Self {
            entries,
            generation: Some(generation),
        })
    }

    /// The store generation it reflects, if any.
    pub fn generation(&self) -> Option<u64> {
        self.generation
    }

    /// How many patients it holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if it holds none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Approximate bytes held per patient (for the benchmark).
    pub fn bytes_per_patient(&self) -> usize {
        let text: usize = self
            .entries
            .iter()
            .map(|e| {
                e.family.capacity()
                    + e.district.capacity()
                    + e.given.iter().map(String::capacity).sum::<usize>()
                    + e.given.capacity() * size_of::<String>()
            })
            .sum();
        (text + self.entries.capacity() * size_of::<Entry>())
            .checked_div(self.entries.len())
            .unwrap_or(0)
    }

    /// Every match for `q`, best first (ties by NHS number).
    pub fn search(&self, q: &Query) -> Vec<Match> {
        let mut out: Vec<Match> = self.entries.iter().filter_map(|e| score(q, e)).collect();
        out.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then(a.nhs.as_u64().cmp(&b.nhs.as_u64()))
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sync_protocol::record::HumanName;
    use sync_protocol::types::{PostcodeDistrict, Text};

    fn patient(n: &str, family: &str, given: &str, birth: Date, district: &str) -> PatientRecord {
        let mut r = carecache_synth::Generator::new(1).patient();
        r.nhs_number = NhsNumber::parse(n).unwrap();
        r.demographics = Demographics::new(
            HumanName {
                family: Text::new(family).unwrap(),
                given: Text::new(given).unwrap(),
                prefix: None,
            },
            birth,
            Sex::Female,
            PostcodeDistrict::new(district).ok(),
            None,
            false,
        )
        .unwrap();
        r
    }

    fn people() -> Vec<PatientRecord> {
        vec![
            patient(
                "9990000018",
                "O'Brien",
                "Siobhán Mary",
                Date::ymd(1950, 3, 7).unwrap(),
                "WV10",
            ),
            patient(
                "9990000026",
                "MacDonald",
                "Ann",
                Date::ymd(1944, 11, 2).unwrap(),
                "B1",
            ),
            patient(
                "9990000034",
                "Smith-Jones",
                "Peter",
                Date::year_only(1962).unwrap(),
                "WV10",
            ),
            patient(
                "9990000042",
                "Obrien",
                "Sean",
                Date::ymd(1950, 7, 3).unwrap(),
                "DY1",
            ),
        ]
    }

    fn find(q: Query) -> Vec<(String, Vec<&'static str>)> {
        Index::build(&people())
            .search(&q)
            .into_iter()
            .map(|m| (m.nhs.digits(), m.reasons))
            .collect()
    }

    fn q(f: &str, g: &str, b: &str, p: &str) -> Query {
        let o = |s: &str| (!s.is_empty()).then_some(s.to_owned());
        Query::new(
            o(f).as_deref(),
            o(g).as_deref(),
            o(b).as_deref(),
            None,
            o(p).as_deref(),
        )
        .unwrap()
    }

    #[test]
    fn names_normalise_case_accents_apostrophes_hyphens_and_mac() {
        assert_eq!(normalise("O'Brien"), "obrien");
        assert_eq!(normalise("  SIOBHÁN "), "siobhan");
        assert_eq!(normalise("Smith-Jones"), "smith jones");
        assert_eq!(normalise("MacDonald"), normalise("McDonald"));
        assert_eq!(normalise("Zoë"), "zoe");
        assert_eq!(normalise("Mack"), "mack");
    }

    #[test]
    fn misspellings_swapped_dates_and_partial_postcodes_are_found_and_ranked() {
        // A relative spells it as it sounds, and gives the date the US way round.
        let r = find(q("OBrian", "", "07/03/1950", ""));
        assert_eq!(r.first().map(|m| m.0.as_str()), Some("9990000018"), "{r:?}");
        // 1950-07-03 is the other Obrien exactly, and O'Brien swapped: both, exact first.
        let r = find(q("o'brien", "", "1950-07-03", ""));
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].0, "9990000042");
        assert!(r[1].1.contains(&"date of birth with day and month swapped"));
        // A full postcode matches by its district; accents need not be typed.
        let r = find(q("", "Siobhan", "", "wv10 9qr"));
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].0, "9990000018");
        // One changed letter in a short name, which Jaro-Winkler alone marks down.
        assert!(strsim::jaro_winkler("shew", "shaw") < NAME_SIMILARITY);
        assert!(name_match("shew", "shaw").is_some());
        assert!(name_match("shew", "shore").is_none());
        // Mac/Mc, one part of a double name, a year-only record.
        assert_eq!(
            find(q("McDonald", "Ann", "1944-11-02", ""))[0].0,
            "9990000026"
        );
        let r = find(q("Jones", "", "", "WV10"));
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, "9990000034");
        assert!(
            find(q("", "Peter", "1962-05-05", ""))[0]
                .1
                .contains(&"year of birth (the record holds no more)")
        );
    }

    #[test]
    fn a_search_needs_two_criteria_and_a_match_must_meet_two() {
        let one = Query::new(Some("Smith"), Some("Ann"), None, None, None);
        assert_eq!(one.unwrap_err(), QueryError::TooBroad);
        assert!(Query::new(None, None, Some("1950"), Some("female"), None).is_err());
        // Only the postcode matches: not a match.
        assert!(find(q("Nobody", "", "", "WV10")).is_empty());
        assert_eq!(
            Query::new(Some("x"), None, Some("31-31-31"), None, None).unwrap_err(),
            QueryError::BadDate
        );
        assert_eq!(
            Query::new(Some("x"), None, None, None, Some("W!")).unwrap_err(),
            QueryError::BadPostcode
        );
    }

    #[test]
    fn debug_shows_no_term() {
        let text = format!("{:?}", q("O'Brien", "Siobhan", "1950-03-07", "WV10 9QR"));
        assert!(
            !text.to_lowercase().contains("brien") && !text.contains("1950"),
            "{text}"
        );
    }
}
