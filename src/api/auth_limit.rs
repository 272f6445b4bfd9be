//! Failed authentications, counted per client and minute so that nobody can flood the
//! audit log or the disk with them: the first failure of a minute for a client and
//! reason is audited at once as an `AuthFailure` entry of its own; the rest of that
//! minute are counted and audited as one `AuthFailures` entry when the minute is over;
//! past [`LIMIT_PER_MINUTE`] in a minute they are refused with `429` before anything else.
//! "Client" is the registration a revoked token named, or none (no token, an unknown
//! one).

use std::collections::HashMap;
use std::sync::Mutex;

use sync_protocol::audit::{AuditEvent, AuthFailure};
use sync_protocol::types::{Text, Timestamp};

/// Failed authentications per client, reason and minute answered `401`; past it, `429`.
pub(crate) const LIMIT_PER_MINUTE: u32 = 60;

const MINUTE_MS: u64 = 60_000;

/// What to do with one failed authentication.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    /// The first of its minute: audit it as it is.
    First,
    /// Counted, audited with the rest of its minute.
    Counted,
    /// Over the limit: refuse with `429`, retry after this many seconds.
    Limited {
        /// Seconds to the next minute.
        retry_after_secs: u64,
    },
}

struct Window {
    minute: u64,
    client: Option<Text<64>>,
    reason: AuthFailure,
    seen: u32,
}

impl Window {
    /// The entry for the failures after the first, if any.
    fn event(&self) -> Option<AuditEvent> {
        let count = self.seen.checked_sub(1).filter(|n| *n > 0)?;
        Some(AuditEvent::AuthFailures {
            client: self.client.clone(),
            reason: self.reason,
            minute: Timestamp::from_millis(self.minute.saturating_mul(MINUTE_MS)).ok()?,
            count,
        })
    }
}

/// The windows of the minute under way.
#[derive(Default)]
pub(crate) struct AuthFailures {
    windows: Mutex<HashMap<(Option<String>, u8), Window>>,
}

impl std::fmt::Debug for AuthFailures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthFailures").finish_non_exhaustive()
    }
}

fn tag(reason: AuthFailure) -> u8 {
    match reason {
        AuthFailure::NoToken => 0,
        AuthFailure::UnknownToken => 1,
        AuthFailure::RevokedToken => 2,
    }
}

impl AuthFailures {
    /// Notes one failure at trusted time `now`: what to do with it, and the entries for
    /// minutes that have ended (to audit first).
    pub(crate) fn note(
        &self,
        client: Option<&Text<64>>,
        reason: AuthFailure,
        now: Timestamp,
    ) -> (Seen, Vec<AuditEvent>) {
        let minute = now.as_millis() / MINUTE_MS;
        let mut windows = self
            .windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let ended = Self::take(&mut windows, |w| w.minute < minute);
        let w = windows
            .entry((client.map(|c| c.as_str().to_owned()), tag(reason)))
            .or_insert_with(|| Window {
                minute,
                client: client.cloned(),
                reason,
                seen: 0,
            });
        w.seen = w.seen.saturating_add(1);
        let seen = match w.seen {
            1 => Seen::First,
            n if n <= LIMIT_PER_MINUTE => Seen::Counted,
            _ => Seen::Limited {
                retry_after_secs: (MINUTE_MS - now.as_millis() % MINUTE_MS).div_ceil(1000),
            },
        };
        (seen, ended)
    }

    /// The entries for every minute that has ended by `now` (all of them with
    /// `everything`, at shutdown).
    pub(crate) fn ended(&self, now: Timestamp, everything: bool) -> Vec<AuditEvent> {
        let minute = now.as_millis() / MINUTE_MS;
        let mut windows = self
            .windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Self::take(&mut windows, |w| everything || w.minute < minute)
    }

    fn take(
        windows: &mut HashMap<(Option<String>, u8), Window>,
        over: impl Fn(&Window) -> bool,
    ) -> Vec<AuditEvent> {
        let mut out = Vec::new();
        windows.retain(|_, w| {
            if over(w) {
                out.extend(w.event());
                false
            } else {
                true
            }
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Timestamp {
        Timestamp::from_millis(1_795_507_200_000 + ms).unwrap()
    }

    #[test]
    fn the_first_of_a_minute_is_audited_the_rest_counted_then_limited() {
        let f = AuthFailures::default();
        let (seen, ended) = f.note(None, AuthFailure::NoToken, at(0));
        assert_eq!((seen, ended.len()), (Seen::First, 0));
        for i in 1..LIMIT_PER_MINUTE {
            assert_eq!(
                f.note(None, AuthFailure::NoToken, at(u64::from(i))).0,
                Seen::Counted
            );
        }
        assert_eq!(
            f.note(None, AuthFailure::NoToken, at(45_000)).0,
            Seen::Limited {
                retry_after_secs: 15
            }
        );
        // Another reason has its own count.
        assert_eq!(
            f.note(None, AuthFailure::UnknownToken, at(50_000)).0,
            Seen::First
        );
        // The next minute: the last one's counts come out, once.
        let (seen, ended) = f.note(None, AuthFailure::NoToken, at(61_000));
        assert_eq!(seen, Seen::First);
        assert_eq!(
            ended,
            vec![AuditEvent::AuthFailures {
                client: None,
                reason: AuthFailure::NoToken,
                minute: at(0),
                count: LIMIT_PER_MINUTE,
            }]
        );
        assert!(f.ended(at(61_500), false).is_empty());
        assert_eq!(
            f.ended(at(200_000), false).len(),
            0,
            "one failure: nothing to add"
        );
    }
}
