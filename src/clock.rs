//! Clocks and trusted time.
//!
//! The device's wall clock can be wrong or set back on purpose; leases must not be
//! extended by it (DESIGN.md invariant 3). Trusted time is the highest of: the wall
//! clock, the highest time seen before (persisted across restarts) advanced by the
//! monotonic clock since, and the hub's time. It never runs backwards, so rolling the
//! wall clock back freezes nothing: trusted time keeps advancing at the monotonic rate
//! from the highest point reached.
//!
//! Everything here is pure; the caller supplies the [`Clock`] (the system's, or a
//! [`ManualClock`] in tests) and persists [`TrustedTime::high_water`].

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sync_protocol::types::Timestamp;

/// The largest valid protocol timestamp (year 9999).
const MAX_MS: u64 = Timestamp::END - 1;

/// Where wall and monotonic time come from.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The wall clock: milliseconds since 1970 as the device believes.
    fn wall_ms(&self) -> u64;
    /// A clock that never goes backwards, from an arbitrary origin.
    fn monotonic(&self) -> Duration;
}

/// The operating system's clocks.
#[derive(Debug)]
pub struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    /// A system clock whose monotonic origin is now.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn wall_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(MAX_MS))
    }

    fn monotonic(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// A clock tests move by hand: `advance` moves both clocks as real time passing would;
/// `set_wall` moves only the wall clock, as someone changing the device's clock would.
#[derive(Debug)]
pub struct ManualClock {
    wall: AtomicU64,
    mono: AtomicU64,
}

impl ManualClock {
    /// A manual clock whose wall clock reads `wall_ms`.
    pub fn new(wall_ms: u64) -> Self {
        Self {
            wall: AtomicU64::new(wall_ms),
            mono: AtomicU64::new(0),
        }
    }

    /// Real time passes: both clocks move forward.
    pub fn advance(&self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.wall.fetch_add(ms, Ordering::SeqCst);
        self.mono.fetch_add(ms, Ordering::SeqCst);
    }

    /// Someone sets the wall clock; monotonic time does not move.
    pub fn set_wall(&self, wall_ms: u64) {
        self.wall.store(wall_ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn wall_ms(&self) -> u64 {
        self.wall.load(Ordering::SeqCst)
    }

    fn monotonic(&self) -> Duration {
        Duration::from_millis(self.mono.load(Ordering::SeqCst))
    }
}

/// Trusted time: never earlier than any time observed before — except when the hub, in
/// a mutually authenticated exchange bound to a fresh nonce, says the device's clock ran
/// ahead ([`TrustedTime::correct_to`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrustedTime {
    /// The highest trusted time reached, in ms.
    base_ms: u64,
    /// The monotonic reading when `base_ms` was reached.
    base_mono: Duration,
    /// Added to the wall clock (never positive): how far the hub found the wall clock
    /// ahead at the last correction, so a clock that is still wrong does not carry
    /// trusted time forward again. Each later hub time brings it back towards 0.
    wall_offset_ms: i64,
}

impl TrustedTime {
    /// Starts from the persisted high-water mark, if any.
    pub fn resume(high_water: Option<Timestamp>, clock: &dyn Clock) -> Self {
        Self::resume_with(high_water, 0, clock)
    }

    /// Starts from the persisted high-water mark and wall-clock offset.
    pub fn resume_with(
        high_water: Option<Timestamp>,
        wall_offset_ms: i64,
        clock: &dyn Clock,
    ) -> Self {
        let mut t = Self {
            base_ms: high_water.map_or(0, Timestamp::as_millis),
            base_mono: clock.monotonic(),
            wall_offset_ms: wall_offset_ms.min(0),
        };
        t.now(clock);
        t
    }

    /// The wall clock as trusted time counts it (the correction applied).
    fn wall(&self, clock: &dyn Clock) -> u64 {
        clock
            .wall_ms()
            .saturating_sub(self.wall_offset_ms.unsigned_abs())
    }

    /// Trusted time now: the wall clock (corrected), or the last high point advanced by
    /// monotonic time, whichever is later.
    pub fn now(&mut self, clock: &dyn Clock) -> Timestamp {
        let mono = clock.monotonic();
        let elapsed =
            u64::try_from(mono.saturating_sub(self.base_mono).as_millis()).unwrap_or(u64::MAX);
        let carried = self.base_ms.saturating_add(elapsed);
        let now = self.wall(clock).max(carried).min(MAX_MS);
        self.base_ms = now;
        self.base_mono = mono;
        clamp(now)
    }

    /// Takes the hub's time into account (after it passed [`check_hub_time`]): trusted time
    /// moves forward to it, never back.
    pub fn observe(&mut self, hub: Timestamp, clock: &dyn Clock) -> Timestamp {
        self.relax_offset(hub, clock);
        let now = self.now(clock);
        if hub > now {
            self.base_ms = hub.as_millis();
            self.base_mono = clock.monotonic();
            return hub;
        }
        now
    }

    /// Sets trusted time to the hub's, back or forward, and discounts the wall clock by
    /// how far it is ahead of the hub. Only for hub time bound to a fresh nonce in a
    /// mutually authenticated exchange (SPEC.md §3.9); returns trusted time before.
    pub fn correct_to(&mut self, hub: Timestamp, clock: &dyn Clock) -> Timestamp {
        let before = self.now(clock);
        let wall = i128::from(clock.wall_ms());
        let ahead = wall - i128::from(hub.as_millis());
        self.wall_offset_ms = i64::try_from(-ahead.max(0)).unwrap_or(i64::MIN);
        self.base_ms = hub.as_millis();
        self.base_mono = clock.monotonic();
        before
    }

    /// A hub time accepted normally: a wall clock found ahead at a correction is
    /// trusted again as far as it now agrees with the hub (a repaired clock stops being
    /// discounted).
    fn relax_offset(&mut self, hub: Timestamp, clock: &dyn Clock) {
        if self.wall_offset_ms < 0 {
            let gap = i128::from(hub.as_millis()) - i128::from(clock.wall_ms());
            let gap = i64::try_from(gap.min(0)).unwrap_or(i64::MIN);
            self.wall_offset_ms = self.wall_offset_ms.max(gap);
        }
    }

    /// The wall-clock offset to persist with the high-water mark (ms, never positive).
    pub fn wall_offset_ms(&self) -> i64 {
        self.wall_offset_ms
    }

    /// The value to persist so a restart cannot go back past it.
    pub fn high_water(&self) -> Timestamp {
        clamp(self.base_ms)
    }
}

/// The hub's time is too far from trusted time to believe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("hub time is {} {} this device's trusted time (at most {} s allowed); check the clocks", human(*.difference_secs), if *.ahead { "ahead of" } else { "behind" }, .limit_secs)]
pub struct HubTimeError {
    /// True when the hub is ahead.
    pub ahead: bool,
    /// How far apart, in seconds.
    pub difference_secs: u64,
    /// The configured limit.
    pub limit_secs: u64,
}

/// Accepts a hub time within `max_skew` of trusted time `now`.
pub fn check_hub_time(
    hub: Timestamp,
    now: Timestamp,
    max_skew: Duration,
) -> Result<(), HubTimeError> {
    let (ahead, diff) = if hub >= now {
        (true, hub.as_millis() - now.as_millis())
    } else {
        (false, now.as_millis() - hub.as_millis())
    };
    let limit = u64::try_from(max_skew.as_millis()).unwrap_or(u64::MAX);
    if diff > limit {
        return Err(HubTimeError {
            ahead,
            difference_secs: diff / 1000,
            limit_secs: max_skew.as_secs(),
        });
    }
    Ok(())
}

/// A timestamp as RFC 3339 UTC to the second (`2026-11-24T08:00:00Z`).
pub fn rfc3339(t: Timestamp) -> String {
    t.utc_seconds()
}

/// A duration in words, for status and error text: "3 d 4 h", "12 min", "40 s".
pub fn human(secs: u64) -> String {
    const DAY: u64 = 86_400;
    if secs >= 365 * DAY {
        format!("{:.1} years", secs as f64 / (365.25 * DAY as f64))
    } else if secs >= DAY {
        format!("{} d {} h", secs / DAY, secs % DAY / 3600)
    } else if secs >= 3600 {
        format!("{} h {} min", secs / 3600, secs % 3600 / 60)
    } else if secs >= 60 {
        format!("{} min", secs / 60)
    } else {
        format!("{secs} s")
    }
}

fn clamp(ms: u64) -> Timestamp {
    Timestamp::from_millis(ms.min(MAX_MS))
        .or_else(|_| Timestamp::from_millis(0))
        .unwrap_or_else(|_| unreachable!("0 is a valid timestamp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_795_507_200_000;
    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn setting_the_wall_clock_back_does_not_stop_or_reverse_time() {
        let clock = ManualClock::new(T0);
        let mut t = TrustedTime::resume(None, &clock);
        assert_eq!(t.now(&clock).as_millis(), T0);
        clock.set_wall(T0 - 86_400_000);
        assert_eq!(t.now(&clock).as_millis(), T0, "never backwards");
        clock.advance(Duration::from_secs(60));
        assert_eq!(t.now(&clock).as_millis(), T0 + 60_000, "keeps advancing");
    }

    #[test]
    fn restart_resumes_from_the_high_water_mark() {
        let clock = ManualClock::new(T0);
        let mut t = TrustedTime::resume(None, &clock);
        clock.advance(DAY);
        t.now(&clock);
        let persisted = t.high_water();
        let rebooted = ManualClock::new(T0);
        let mut t2 = TrustedTime::resume(Some(persisted), &rebooted);
        assert_eq!(t2.now(&rebooted), persisted);
    }

    #[test]
    fn hub_time_moves_trusted_time_forward_only() {
        let clock = ManualClock::new(T0);
        let mut t = TrustedTime::resume(None, &clock);
        let ahead = Timestamp::from_millis(T0 + 5_000).unwrap();
        assert_eq!(t.observe(ahead, &clock), ahead);
        let behind = Timestamp::from_millis(T0 - 5_000).unwrap();
        assert_eq!(t.observe(behind, &clock), ahead);
    }

    #[test]
    fn a_correction_sets_time_back_and_a_wall_clock_still_ahead_does_not_undo_it() {
        let clock = ManualClock::new(T0 + 3650 * 86_400_000);
        let mut t = TrustedTime::resume(None, &clock);
        let hub = Timestamp::from_millis(T0).unwrap();
        let before = t.correct_to(hub, &clock);
        assert_eq!(before.as_millis(), T0 + 3650 * 86_400_000);
        assert_eq!(
            t.now(&clock),
            hub,
            "the wall clock, still ten years ahead, is discounted"
        );
        clock.advance(Duration::from_secs(60));
        assert_eq!(t.now(&clock).as_millis(), T0 + 60_000, "and time goes on");
        // A restart keeps the correction.
        let mut t2 = TrustedTime::resume_with(Some(t.high_water()), t.wall_offset_ms(), &clock);
        assert_eq!(t2.now(&clock).as_millis(), T0 + 60_000);
        // The clock is repaired; the next hub time stops discounting it.
        let repaired = ManualClock::new(T0 + 120_000);
        let mut t3 = TrustedTime::resume_with(Some(t.high_water()), t.wall_offset_ms(), &repaired);
        t3.observe(Timestamp::from_millis(T0 + 120_000).unwrap(), &repaired);
        assert_eq!(t3.wall_offset_ms(), 0);
        repaired.set_wall(T0 + 86_400_000);
        assert_eq!(
            t3.now(&repaired).as_millis(),
            T0 + 86_400_000,
            "the wall clock counts again"
        );
    }

    #[test]
    fn far_hub_time_is_refused_both_ways() {
        let now = Timestamp::from_millis(T0).unwrap();
        let skew = Duration::from_secs(900);
        let ten_years = Timestamp::from_millis(T0 + 3650 * 86_400_000).unwrap();
        let err = check_hub_time(ten_years, now, skew).unwrap_err();
        assert!(
            err.ahead && err.to_string().contains("years ahead"),
            "{err}"
        );
        let behind = Timestamp::from_millis(T0 - 2 * 86_400_000).unwrap();
        assert!(!check_hub_time(behind, now, skew).unwrap_err().ahead);
        let close = Timestamp::from_millis(T0 + 899_000).unwrap();
        assert!(check_hub_time(close, now, skew).is_ok());
    }
}
