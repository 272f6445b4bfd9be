//! FHIR `date`, `dateTime` and `instant` to and from the protocol's own types. Reading
//! keeps what the source wrote: a partial date stays partial, and a date or time without
//! a zone is read as the range of instants it could mean.

use sync_protocol::types::{Date, Timestamp};

/// A FHIR date or dateTime to a (possibly partial) date: `1990`, `1990-05`,
/// `1990-05-12`, `1990-05-12T…`.
pub fn date(s: &str) -> Result<Date, &'static str> {
    let day_part = s.split('T').next().unwrap_or(s);
    let mut parts = day_part.split('-');
    let num = |p: Option<&str>, len: usize| -> Result<Option<u16>, &'static str> {
        match p {
            None => Ok(None),
            Some(p) if p.len() == len && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse().map(Some).map_err(|_| "bad date")
            }
            Some(_) => Err("bad date"),
        }
    };
    let y = num(parts.next(), 4)?.ok_or("bad date")?;
    let m = num(parts.next(), 2)?;
    let d = num(parts.next(), 2)?;
    if parts.next().is_some() {
        return Err("bad date");
    }
    let narrow = |v: u16| u8::try_from(v).map_err(|_| "bad date");
    match (m, d) {
        (None, _) => Date::year_only(y),
        (Some(m), None) => Date::ym(y, narrow(m)?),
        (Some(m), Some(d)) => Date::ymd(y, narrow(m)?, narrow(d)?),
    }
    .map_err(|_| "date out of range")
}

/// An RFC 3339 instant (FHIR `instant`, or a `dateTime` with a zone) to a timestamp.
pub fn instant(s: &str) -> Result<Timestamp, &'static str> {
    Timestamp::from_rfc3339(s).ok_or("bad instant")
}

/// The earliest and latest instants a FHIR `date` or `dateTime` allows. A year,
/// year-month or date spans its whole period; one without a zone (a date, or a dateTime
/// written without one) is widened by 14 hours each way, since the source's offset could
/// be any. `None` if it cannot be read.
pub fn instant_range(s: &str) -> Option<(Timestamp, Timestamp)> {
    const ZONE_SLACK_MS: u64 = 14 * 3_600_000;
    if let Ok(t) = instant(s) {
        return Some((t, t));
    }
    let (day_part, time_part) = match s.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (s, None),
    };
    date(day_part).ok()?;
    let mut parts = day_part.split('-');
    let y: i32 = parts.next()?.parse().ok()?;
    let m: Option<u8> = parts.next().map(str::parse).transpose().ok()?;
    let d: Option<u8> = parts.next().map(str::parse).transpose().ok()?;
    let day = |y: i32, m: u8, d: u8| -> Option<i64> {
        let month = time::Month::try_from(m).ok()?;
        let date = time::Date::from_calendar_date(y, month, d).ok()?;
        Some(date.midnight().assume_utc().unix_timestamp() * 1000)
    };
    let (start, end) = match (m, d, time_part) {
        (None, _, _) => (day(y, 1, 1)?, day(y.checked_add(1)?, 1, 1)?),
        (Some(m), None, _) => {
            let (ny, nm) = if m == 12 {
                (y.checked_add(1)?, 1)
            } else {
                (y, m + 1)
            };
            (day(y, m, 1)?, day(ny, nm, 1)?)
        }
        (Some(m), Some(d), None) => {
            let start = day(y, m, d)?;
            (start, start.checked_add(86_400_000)?)
        }
        (Some(m), Some(d), Some(t)) => {
            // A local time with no zone: that instant at any offset.
            let mut hms = t.split(['.', '+', '-', 'Z']).next()?.split(':');
            let h: i64 = hms.next()?.parse().ok()?;
            let mi: i64 = hms.next()?.parse().ok()?;
            let sec: i64 = hms.next().map(str::parse).transpose().ok()?.unwrap_or(0);
            if !(0..24).contains(&h) || !(0..60).contains(&mi) || !(0..61).contains(&sec) {
                return None;
            }
            let at = day(y, m, d)? + ((h * 60 + mi) * 60 + sec) * 1000;
            (at, at + 1)
        }
    };
    let start = u64::try_from(start).ok()?.saturating_sub(ZONE_SLACK_MS);
    let end = u64::try_from(end)
        .ok()?
        .saturating_sub(1)
        .saturating_add(ZONE_SLACK_MS);
    Some((
        Timestamp::from_millis(start).ok()?,
        Timestamp::from_millis(end.min(Timestamp::END - 1)).ok()?,
    ))
}

/// A timestamp as a FHIR `instant` to the second (UTC).
pub fn instant_text(t: Timestamp) -> String {
    t.utc_seconds()
}

/// A (possibly partial) date as a FHIR `date`.
pub fn date_text(d: Date) -> String {
    d.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_dates() {
        assert_eq!(date("1990").map(|d| d.to_string()), Ok("1990".into()));
        assert_eq!(date("1990-05").map(|d| d.to_string()), Ok("1990-05".into()));
        assert_eq!(
            date("1990-05-12T10:00:00Z").map(|d| d.to_string()),
            Ok("1990-05-12".into())
        );
        for bad in ["", "90", "1990-5", "1990-02-30", "1990-01-01-01", "abcd"] {
            assert!(date(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn instants_keep_milliseconds() {
        assert_eq!(
            instant("2024-01-02T03:04:05.678Z").map(Timestamp::as_millis),
            Ok(1_704_164_645_678)
        );
        assert!(instant("2024-01-02").is_err());
    }
}
