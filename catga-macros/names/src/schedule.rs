//! When a recurring job's occurrences fall: `every = "30s"` (multiples of
//! the period since the Unix epoch, so that every replica computes the
//! same instants) or a cron expression, in UTC or in a time zone. The
//! macro checks an expression and a zone's name at compile time with this
//! code, and the runtime computes the occurrences with it: both read it
//! the same way.
//!
//! Times are milliseconds since the Unix epoch. A cron expression has six
//! fields, `second minute hour day-of-month month day-of-week`, or the
//! usual five without the seconds (then at second 0). A field is `*`, a
//! value, a range `a-b`, a step `*/n`, `a-b/n` or `a/n`, or a list of
//! those; months and days of the week also take their English
//! three-letter names (`JAN`, `MON`), and day of week 7 is Sunday like 0.
//! As in Vixie cron, when both day fields are restricted a day matches
//! either of them.
//!
//! In a time zone, a cron expression reads the zone's wall clock, and
//! clock changes are handled as Vixie cron does:
//! - An expression whose minute or hour field starts with `*` (`*/5 * * *
//!   *`) runs by elapsed time: through a change, every instant whose wall
//!   clock matches is an occurrence, so a repeated hour runs twice and a
//!   skipped one not at all.
//! - Any other (`30 2 * * *`) runs at fixed times of day, once a day: a
//!   time skipped when the clocks go forward runs at the instant of the
//!   change, and a time repeated when they go back runs the first time
//!   only.
//!
//! The zones come from the IANA database bundled in the binary (not the
//! machine's), so that replicas on different images agree.

use jiff::Timestamp;
use jiff::tz::{AmbiguousOffset, Offset, TimeZone};

/// The shortest `every` a job may have.
pub const MIN_EVERY_MS: u64 = 100;

/// How far ahead an occurrence is looked for: 8 years covers every leap
/// day (a year divisible by 100 but not by 400 skips one).
const SEARCH_DAYS: i64 = 8 * 366;

/// A parsed cron expression: one bit per allowed value of each field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cron {
    seconds: u64,
    minutes: u64,
    hours: u32,
    /// Bits 1 to 31.
    days: u32,
    /// Bits 1 to 12.
    months: u16,
    /// Bits 0 (Sunday) to 6.
    weekdays: u8,
    days_restricted: bool,
    weekdays_restricted: bool,
    /// The minute or hour field starts with `*`: in a time zone, it runs
    /// by elapsed time through a clock change.
    by_elapsed_time: bool,
}

/// How many clock changes or skipped candidates a zoned search crosses
/// before it gives up: 8 years of two changes a year, or every second of
/// a repeated hour, are far below.
const MAX_STEPS: usize = 10_000;

/// Parses a cron expression (see the module's text), refusing one that
/// never fires.
pub fn parse_cron(text: &str) -> Result<Cron, String> {
    let fields: Vec<&str> = text.split_whitespace().collect();
    let (sec, rest) = match fields.len() {
        6 => (fields[0], &fields[1..]),
        5 => ("0", &fields[..]),
        n => {
            return Err(format!(
                "a cron expression has 6 fields (second minute hour day-of-month month day-of-week) \
                 or 5 (without the second), found {n}"
            ));
        }
    };
    let field = |name: &str, text: &str, min: u32, max: u32, names: &[&str]| {
        parse_field(text, min, max, names).map_err(|why| format!("{name} field `{text}`: {why}"))
    };
    let seconds = field("second", sec, 0, 59, &[])?;
    let minutes = field("minute", rest[0], 0, 59, &[])?;
    let hours = field("hour", rest[1], 0, 23, &[])?;
    let days = field("day-of-month", rest[2], 1, 31, &[])?;
    let months = field("month", rest[3], 1, 12, &MONTHS)?;
    let mut weekdays = field("day-of-week", rest[4], 0, 7, &WEEKDAYS)?;
    if weekdays & (1 << 7) != 0 {
        weekdays = (weekdays & !(1 << 7)) | 1;
    }
    let cron = Cron {
        seconds,
        // Each set fits its field's width: the values were checked.
        minutes,
        hours: hours as u32,
        days: days as u32,
        months: months as u16,
        weekdays: weekdays as u8,
        days_restricted: !is_star(rest[2]),
        weekdays_restricted: !is_star(rest[4]),
        by_elapsed_time: is_star(rest[0]) || is_star(rest[1]),
    };
    // From 2000-03-01: any date of the month and weekday rules recurs
    // within the search window, so "none found" means "never".
    if cron.next_after(951_868_800_000).is_none() {
        return Err("it never fires: no date matches its day, month and day-of-week fields".to_owned());
    }
    Ok(cron)
}

const MONTHS: [&str; 12] = [
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const WEEKDAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

/// A day field that starts with `*` (`*`, `*/2`) leaves the other day
/// field alone, as in Vixie cron.
fn is_star(field: &str) -> bool {
    field.starts_with('*')
}

/// One field: a bit per allowed value in `min..=max`.
fn parse_field(text: &str, min: u32, max: u32, names: &[&str]) -> Result<u64, String> {
    let mut bits = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s
                    .parse()
                    .ok()
                    .filter(|_| s.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| format!("the step `{s}` is not a whole number"))?;
                if step == 0 || step > max {
                    return Err(format!("the step {step} must be from 1 to {max}"));
                }
                (r, Some(step))
            }
            None => (part, None),
        };
        let (lo, hi) = if range == "*" {
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            (value(a, min, max, names)?, value(b, min, max, names)?)
        } else {
            let v = value(range, min, max, names)?;
            // `a/n` runs from `a` to the end of the range.
            (v, if step.is_some() { max } else { v })
        };
        if lo > hi {
            return Err(format!("the range {lo}-{hi} runs backwards"));
        }
        let step = step.unwrap_or(1);
        let mut v = lo;
        while v <= hi {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok(bits)
}

fn value(text: &str, min: u32, max: u32, names: &[&str]) -> Result<u32, String> {
    if text == "?" {
        return Err("`?` is not supported; write `*`".to_owned());
    }
    let upper = text.to_ascii_uppercase();
    if let Some(i) = names.iter().position(|n| *n == upper) {
        // Names count from the range's start: months from 1, weekdays
        // from 0 (Sunday).
        return Ok(i as u32 + min);
    }
    let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    let v: u32 = text.parse().ok().filter(|_| digits).ok_or_else(|| {
        if text.is_empty() {
            "a value is missing".to_owned()
        } else {
            format!("`{text}` is not a value")
        }
    })?;
    if !(min..=max).contains(&v) {
        return Err(format!("{v} is out of range {min}-{max}"));
    }
    Ok(v)
}

impl Cron {
    fn day_matches(&self, days: i64) -> bool {
        let (_, month, day) = civil_from_days(days);
        if self.months & (1 << month) == 0 {
            return false;
        }
        let weekday = (days + 4).rem_euclid(7) as u32; // 1970-01-01 was a Thursday.
        let by_day = self.days & (1 << day) != 0;
        let by_weekday = self.weekdays & (1 << weekday) != 0;
        match (self.days_restricted, self.weekdays_restricted) {
            (true, true) => by_day || by_weekday,
            (true, false) => by_day,
            (false, true) => by_weekday,
            (false, false) => true,
        }
    }

    /// The first allowed second of a day at or after `from` (seconds into
    /// the day).
    fn first_in_day(&self, from: u32) -> Option<u32> {
        (from..86_400).find(|&t| self.time_matches(t))
    }

    /// The last allowed second of a day at or before `until`.
    fn last_in_day(&self, until: u32) -> Option<u32> {
        (0..=until).rev().find(|&t| self.time_matches(t))
    }

    fn time_matches(&self, t: u32) -> bool {
        self.hours & (1 << (t / 3600)) != 0
            && self.minutes & (1 << (t / 60 % 60)) != 0
            && self.seconds & (1 << (t % 60)) != 0
    }

    /// The first occurrence strictly after `ms`.
    pub fn next_after(&self, ms: u64) -> Option<u64> {
        let secs = (ms / 1000) as i64 + 1;
        let (mut day, mut from) = (secs.div_euclid(86_400), secs.rem_euclid(86_400) as u32);
        for _ in 0..SEARCH_DAYS {
            if self.day_matches(day)
                && let Some(t) = self.first_in_day(from)
            {
                return u64::try_from(day * 86_400 + i64::from(t)).ok()?.checked_mul(1000);
            }
            day += 1;
            from = 0;
        }
        None
    }

    /// The last occurrence at or before `ms`.
    pub fn at_or_before(&self, ms: u64) -> Option<u64> {
        let secs = (ms / 1000) as i64;
        let (mut day, mut until) = (secs.div_euclid(86_400), secs.rem_euclid(86_400) as u32);
        for _ in 0..SEARCH_DAYS {
            if day < 0 {
                return None;
            }
            if self.day_matches(day)
                && let Some(t) = self.last_in_day(until)
            {
                return u64::try_from(day * 86_400 + i64::from(t)).ok()?.checked_mul(1000);
            }
            day -= 1;
            until = 86_399;
        }
        None
    }
}

/// Year, month (1-12) and day (1-31) of a day counted from 1970-01-01
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A time zone of the IANA database (as bundled in the binary).
#[derive(Debug, Clone)]
pub struct Zone(TimeZone);

impl PartialEq for Zone {
    fn eq(&self, other: &Zone) -> bool {
        self.0.iana_name() == other.0.iana_name()
    }
}

impl Eq for Zone {}

/// Reads a zone's IANA name (`Europe/Berlin`, `America/New_York`, `UTC`).
pub fn parse_zone(name: &str) -> Result<Zone, String> {
    // The bundled database also answers to other spellings (case, a
    // path); only the exact name is taken, so that what is written is what
    // listings show.
    match TimeZone::get(name) {
        Ok(tz) if tz.iana_name() == Some(name) => Ok(Zone(tz)),
        Ok(tz) => Err(format!(
            "write the zone's name as the IANA database spells it: `{}`",
            tz.iana_name().unwrap_or(name)
        )),
        Err(_) => Err(format!(
            "`{name}` is not a time zone of the IANA database (for example `Europe/Berlin`, \
             `America/New_York`, `UTC`)"
        )),
    }
}

impl Zone {
    /// The zone's name.
    pub fn name(&self) -> &str {
        self.0.iana_name().unwrap_or("UTC")
    }

    /// The zone's offset from UTC at `ms`, in ms.
    fn offset_at(&self, ms: i64) -> Option<i64> {
        let ts = Timestamp::from_millisecond(ms).ok()?;
        Some(i64::from(self.0.to_offset(ts).seconds()) * 1000)
    }

    /// The first clock change strictly after `ms`.
    fn change_after(&self, ms: i64) -> Option<i64> {
        let ts = Timestamp::from_millisecond(ms).ok()?;
        self.0
            .following(ts)
            .next()
            .map(|t| t.timestamp().as_millisecond())
    }

    /// The last clock change at or before `ms`.
    fn change_at_or_before(&self, ms: i64) -> Option<i64> {
        let ts = Timestamp::from_millisecond(ms.checked_add(1)?).ok()?;
        self.0
            .preceding(ts)
            .next()
            .map(|t| t.timestamp().as_millisecond())
    }

    /// The instant a fixed time of day `local` (wall-clock ms, counted as
    /// if in UTC) runs at: the time itself; the first of a repeated time;
    /// the clock change for a time the change skipped.
    fn fixed_instant(&self, local: i64) -> Option<i64> {
        let dt = Offset::UTC.to_datetime(Timestamp::from_millisecond(local).ok()?);
        let instant = |offset: Offset| local - i64::from(offset.seconds()) * 1000;
        match self.0.to_ambiguous_timestamp(dt).offset() {
            AmbiguousOffset::Unambiguous { offset } => Some(instant(offset)),
            // `before` is the larger offset: the earlier instant.
            AmbiguousOffset::Fold { before, .. } => Some(instant(before)),
            // The change lies between the instant read with the later
            // (larger) offset and the one read with the earlier.
            AmbiguousOffset::Gap { after, .. } => self.change_after(instant(after)),
        }
    }
}

impl Cron {
    /// The first occurrence strictly after `ms` in `zone`.
    fn next_after_in(&self, zone: &Zone, ms: u64) -> Option<u64> {
        let ms = i64::try_from(ms).ok()?;
        let local_of = |at: i64, off: i64| u64::try_from(at.checked_add(off)?).ok();
        let found = if self.by_elapsed_time {
            // One stretch of constant offset at a time: the first match in
            // the stretch from `from`, or the next stretch.
            let (mut from, mut probe) = (ms, ms);
            let mut found = None;
            for _ in 0..MAX_STEPS {
                let off = zone.offset_at(probe)?;
                let at = i64::try_from(self.next_after(local_of(from, off)?)?).ok()? - off;
                match zone.change_after(probe) {
                    Some(change) if change <= at => (from, probe) = (change - 1, change),
                    _ => {
                        found = Some(at);
                        break;
                    }
                }
            }
            found?
        } else {
            // Fixed times map to instants in order; those a repeated hour
            // maps before `ms` are passed over.
            let mut local = local_of(ms, zone.offset_at(ms)?)?;
            let mut found = None;
            for _ in 0..MAX_STEPS {
                let candidate = self.next_after(local)?;
                let at = zone.fixed_instant(i64::try_from(candidate).ok()?)?;
                if at > ms {
                    found = Some(at);
                    break;
                }
                local = candidate;
            }
            found?
        };
        u64::try_from(found).ok()
    }

    /// The last occurrence at or before `ms` in `zone`.
    fn at_or_before_in(&self, zone: &Zone, ms: u64) -> Option<u64> {
        let ms = i64::try_from(ms).ok()?;
        let local_of = |at: i64, off: i64| u64::try_from(at.checked_add(off)?).ok();
        let found = if self.by_elapsed_time {
            let mut until = ms;
            let mut found = None;
            for _ in 0..MAX_STEPS {
                let off = zone.offset_at(until)?;
                let at = i64::try_from(self.at_or_before(local_of(until, off)?)?).ok()? - off;
                match zone.change_at_or_before(until) {
                    Some(change) if at < change => until = change - 1,
                    _ => {
                        found = Some(at);
                        break;
                    }
                }
            }
            found?
        } else {
            // In the second pass of a repeated hour, the fixed times up to
            // the end of that hour ran in the first pass, before `ms`.
            let off = zone.offset_at(ms)?;
            let mut local = match zone.change_at_or_before(ms) {
                Some(change) => {
                    let before = zone.offset_at(change - 1)?;
                    let repeated = before - off;
                    if repeated > 0 && ms - change < repeated {
                        local_of(change - 1, before)?
                    } else {
                        local_of(ms, off)?
                    }
                }
                None => local_of(ms, off)?,
            };
            let mut found = None;
            for _ in 0..MAX_STEPS {
                let candidate = self.at_or_before(local)?;
                let at = zone.fixed_instant(i64::try_from(candidate).ok()?)?;
                if at <= ms {
                    found = Some(at);
                    break;
                }
                local = candidate.checked_sub(1)?;
            }
            found?
        };
        u64::try_from(found).ok()
    }
}

/// A job's schedule: a fixed period or a cron expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    /// Every so many milliseconds, at multiples of the period since the
    /// Unix epoch.
    Every(u64),
    /// A cron expression, in UTC.
    Cron(Cron),
    /// A cron expression on the wall clock of a time zone.
    Zoned(Cron, Zone),
}

impl Schedule {
    /// The first occurrence strictly after `ms`.
    pub fn next_after(&self, ms: u64) -> Option<u64> {
        match self {
            Schedule::Every(p) => (ms / p + 1).checked_mul(*p),
            Schedule::Cron(c) => c.next_after(ms),
            Schedule::Zoned(c, zone) => c.next_after_in(zone, ms),
        }
    }

    /// The last occurrence at or before `ms`.
    pub fn at_or_before(&self, ms: u64) -> Option<u64> {
        match self {
            Schedule::Every(p) => Some(ms / p * p).filter(|t| *t > 0),
            Schedule::Cron(c) => c.at_or_before(ms),
            Schedule::Zoned(c, zone) => c.at_or_before_in(zone, ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-06 09:00:00 UTC, a Sunday.
    const SUNDAY_9: u64 = 1_796_547_600_000;

    fn cron(text: &str) -> Cron {
        parse_cron(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn days_convert_like_the_calendar() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_793), (2026, 12, 6));
        assert_eq!((20_793 + 4) % 7, 0, "2026-12-06 is a Sunday");
    }

    #[test]
    fn every_five_minutes_on_the_minute() {
        let c = cron("0 */5 * * * *");
        assert_eq!(c.next_after(SUNDAY_9), Some(SUNDAY_9 + 300_000));
        assert_eq!(c.next_after(SUNDAY_9 - 1), Some(SUNDAY_9));
        assert_eq!(c.at_or_before(SUNDAY_9), Some(SUNDAY_9));
        assert_eq!(c.at_or_before(SUNDAY_9 + 299_999), Some(SUNDAY_9));
        assert_eq!(cron("*/5 * * * *"), c, "five fields start at second 0");
    }

    #[test]
    fn weekdays_names_ranges_and_lists() {
        // Monday to Friday at 08:30: from Sunday 09:00, Monday 08:30.
        let c = cron("0 30 8 * * MON-FRI");
        assert_eq!(c.next_after(SUNDAY_9), Some(SUNDAY_9 + 86_400_000 - 1_800_000));
        // Back from Sunday: Friday 08:30.
        assert_eq!(
            c.at_or_before(SUNDAY_9),
            Some(SUNDAY_9 - 2 * 86_400_000 - 1_800_000)
        );
        assert_eq!(cron("0 0 0 * * 7"), cron("0 0 0 * * sun"));
        assert_eq!(cron("0 0 0 1 jan,JUL *"), cron("0 0 0 1 1,7 *"));
        assert_eq!(cron("0 0 0-23/6 * * *"), cron("0 0 0,6,12,18 * * *"));
        assert_eq!(cron("0 0 12/6 * * *"), cron("0 0 12,18 * * *"));
    }

    #[test]
    fn a_day_field_starting_with_a_star_leaves_the_other_alone() {
        // Every other day of the month, when it is a Monday (Vixie cron).
        let c = cron("0 0 0 */2 * MON");
        let next = c.next_after(SUNDAY_9).expect("next");
        let days = (next / 1000 / 86_400) as i64;
        let (_, _, day) = civil_from_days(days);
        assert_eq!((days + 4).rem_euclid(7), 1, "a Monday");
        assert_eq!(day % 2, 1, "an odd day");
        assert_eq!(cron("0 0 0 * * *").next_after(u64::MAX - 10), None, "no overflow");
    }

    #[test]
    fn restricted_day_fields_match_either() {
        // The 1st of the month or any Sunday, at midnight: after Sunday
        // 2026-12-06 09:00 comes Sunday the 13th... unless the 1st is
        // sooner; 2027-01-01 is later.
        let c = cron("0 0 0 1 * SUN");
        assert_eq!(
            c.next_after(SUNDAY_9),
            Some(SUNDAY_9 - 9 * 3_600_000 + 7 * 86_400_000)
        );
    }

    #[test]
    fn leap_days_are_found_and_impossible_dates_refused() {
        let c = cron("0 0 0 29 2 *");
        // From 2026: 2028-02-29.
        assert_eq!(c.next_after(SUNDAY_9), Some(1_835_395_200_000));
        let e = parse_cron("0 0 0 31 4 *").expect_err("April has 30 days");
        assert!(e.contains("never fires"), "{e}");
    }

    #[test]
    fn mistakes_are_named() {
        for (text, says) in [
            ("* * * *", "found 4"),
            ("61 * * * * *", "second field `61`: 61 is out of range 0-59"),
            ("0 0 25 * * *", "hour field `25`"),
            ("0 0 0 ? * *", "`?` is not supported"),
            ("0 0 0 * FOO *", "`FOO` is not a value"),
            ("0 */0 * * * *", "the step 0"),
            ("0 10-5 * * * *", "runs backwards"),
            ("0 1,,2 * * * *", "a value is missing"),
            ("0 +5 * * * *", "`+5` is not a value"),
        ] {
            let e = parse_cron(text).expect_err(text);
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    const MIN: u64 = 60_000;
    const HOUR: u64 = 3_600_000;
    /// 2026-03-08 07:00 UTC: New York's clocks go from 02:00 EST to 03:00
    /// EDT.
    const NY_FORWARD: u64 = 1_772_953_200_000;
    /// 2026-11-01 06:00 UTC: New York's clocks go back from 02:00 EDT to
    /// 01:00 EST.
    const NY_BACK: u64 = 1_793_512_800_000;

    fn zoned(text: &str, zone: &str) -> Schedule {
        Schedule::Zoned(cron(text), parse_zone(zone).expect(zone))
    }

    /// Every occurrence from `from` for `span`, checked against
    /// `at_or_before` at each and just before each.
    fn occurrences(s: &Schedule, from: u64, span: u64) -> Vec<u64> {
        let mut all = Vec::new();
        let mut at = from;
        while let Some(next) = s.next_after(at).filter(|n| *n < from + span) {
            assert!(next > at);
            assert_eq!(s.at_or_before(next), Some(next), "at {next}");
            let before = s.at_or_before(next - 1);
            if all.is_empty() {
                assert!(before.is_none_or(|b| b <= from), "before {next}: {before:?}");
            } else {
                assert_eq!(before, Some(at), "before {next}");
            }
            all.push(next);
            at = next;
        }
        all
    }

    #[test]
    fn a_fixed_time_skipped_by_the_clocks_runs_at_the_change() {
        let s = zoned("0 30 2 * * *", "America/New_York");
        let day_before = NY_FORWARD - 86_400_000 + 30 * MIN; // 02:30 EST
        assert_eq!(s.next_after(day_before - 1), Some(day_before));
        assert_eq!(s.next_after(day_before), Some(NY_FORWARD), "at 03:00 EDT");
        assert_eq!(s.next_after(NY_FORWARD), Some(NY_FORWARD + 86_400_000 - 30 * MIN));
        assert_eq!(s.at_or_before(NY_FORWARD + HOUR), Some(NY_FORWARD));
        let days = occurrences(&s, day_before - 1, 3 * 86_400_000);
        let after = NY_FORWARD + 86_400_000 - 30 * MIN;
        assert_eq!(
            days,
            [day_before, NY_FORWARD, after, after + 86_400_000],
            "once a day"
        );
    }

    #[test]
    fn a_fixed_time_repeated_by_the_clocks_runs_the_first_time() {
        let s = zoned("0 50 1 * * *", "America/New_York");
        let first = NY_BACK - 10 * MIN; // 01:50 EDT
        assert_eq!(s.next_after(first - 1), Some(first));
        assert_eq!(
            s.next_after(first),
            Some(first + 86_400_000 + HOUR),
            "not at 01:50 EST"
        );
        // In the second 01:45, the last was the first 01:50.
        assert_eq!(s.at_or_before(NY_BACK + 45 * MIN), Some(first));
        let days = occurrences(&s, first - 86_400_000 - 1, 3 * 86_400_000);
        assert_eq!(days, [first - 86_400_000, first, first + 86_400_000 + HOUR]);
    }

    #[test]
    fn a_schedule_by_elapsed_time_follows_the_instants() {
        let s = zoned("0 */30 * * * *", "America/New_York");
        // Back: 01:00 and 01:30 twice, every half hour without a gap.
        let back = occurrences(&s, NY_BACK - 2 * HOUR, 4 * HOUR);
        assert_eq!(back.len(), 7, "{back:?}");
        assert!(back.windows(2).all(|w| w[1] - w[0] == 30 * MIN), "{back:?}");
        // Forward: 01:30 EST, then 03:00 EDT, half an hour later.
        assert_eq!(s.next_after(NY_FORWARD - 30 * MIN), Some(NY_FORWARD));
        let forward = occurrences(&s, NY_FORWARD - 2 * HOUR, 4 * HOUR);
        assert!(forward.windows(2).all(|w| w[1] - w[0] == 30 * MIN), "{forward:?}");
        // Every hour at 02:15 local: none on the day 02:xx is skipped.
        let at_two = zoned("0 15 */1 * * *", "America/New_York");
        assert_eq!(
            at_two.next_after(NY_FORWARD - 44 * MIN),
            Some(NY_FORWARD + 15 * MIN)
        );
    }

    #[test]
    fn zones_without_changes_and_utc() {
        // Tokyo 09:00 is 00:00 UTC, every day of the year.
        let tokyo = zoned("0 0 9 * * *", "Asia/Tokyo");
        let midnight = SUNDAY_9 - 9 * HOUR;
        assert_eq!(tokyo.next_after(SUNDAY_9), Some(midnight + 86_400_000));
        assert_eq!(tokyo.at_or_before(SUNDAY_9), Some(midnight));
        let utc = zoned("0 */5 * * * *", "UTC");
        assert_eq!(
            utc.next_after(SUNDAY_9),
            Schedule::Cron(cron("0 */5 * * * *")).next_after(SUNDAY_9)
        );
        // Berlin's 08:30 on weekdays, a year of them around both changes.
        let berlin = zoned("0 30 8 * * MON-FRI", "Europe/Berlin");
        let year = occurrences(&berlin, SUNDAY_9, 366 * 86_400_000);
        assert!((260..=262).contains(&year.len()), "{}", year.len());
    }

    #[test]
    fn zone_names_are_checked() {
        assert_eq!(
            parse_zone("Europe/Berlin").map(|z| z.name().to_owned()),
            Ok("Europe/Berlin".to_owned())
        );
        let e = parse_zone("Mars/Olympus").expect_err("no such zone");
        assert!(e.contains("not a time zone"), "{e}");
        let e = parse_zone("europe/berlin").expect_err("spelled otherwise");
        assert!(e.contains("`Europe/Berlin`"), "{e}");
    }

    #[test]
    fn every_is_aligned_on_the_epoch() {
        let s = Schedule::Every(500);
        assert_eq!(s.next_after(1_250), Some(1_500));
        assert_eq!(s.next_after(1_500), Some(2_000));
        assert_eq!(s.at_or_before(1_499), Some(1_000));
        assert_eq!(s.at_or_before(1_500), Some(1_500));
        assert_eq!(s.at_or_before(499), None);
    }
}
