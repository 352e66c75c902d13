//! [`TokenLimiter`]: each caller's buckets, and the [`Admission`] a request holds while it runs.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::error::{LimitExceeded, LimitKind};
use crate::{Caller, Usage, UsageCallback, UsageReport};

/// What every limit is counted over.
const MINUTE: Duration = Duration::from_secs(60);

/// The table is not swept of idle callers before it holds this many.
const MIN_SWEEP: usize = 64;

/// Holds each [`Caller`] to its tokens and requests per minute; shared by its clones.
///
/// Each limit is a bucket that holds a minute's worth (`tokens_per_minute` tokens, or
/// `requests_per_minute` requests) and refills evenly over the minute: a caller may spend its
/// whole minute in a burst, then goes on at its rate. A request takes one request and its
/// estimated prompt from the buckets when admitted ([`admit`](Self::admit)); its
/// [`Admission`] is settled with what the answer used once that is known.
///
/// The limits are read from the `Caller` of each call, so a caller whose limits change is held to
/// the new ones from its next request on (the part of its minute it had left carries over). The
/// state is in this process only: several gateways behind one address each allow the whole limit.
/// Memory stays bounded: callers whose buckets are full again are dropped when the table has
/// doubled since it was last swept.
///
/// The clock is tokio's [`Instant`], which tests can pause and advance.
#[derive(Clone, Default)]
pub struct TokenLimiter {
    table: Arc<Mutex<Table>>,
}

impl TokenLimiter {
    /// A limiter that knows no caller yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Admits a request from `caller` whose prompt is estimated at `estimated_tokens` (see
    /// [`estimate_tokens`](super::estimate_tokens)), or says how long it has to wait.
    ///
    /// A caller without limits is always admitted (with an `Admission` that does nothing).
    /// Otherwise the request needs one request and `min(estimated_tokens, tokens_per_minute)`
    /// tokens in the buckets: a prompt estimated above the whole minute goes through once the
    /// bucket is full, rather than never. If both are there, they are taken; if not, nothing is
    /// taken and [`LimitExceeded::retry_after`] is the wait until both would be there (rounded up
    /// to the millisecond). A limit of 0 refuses every request, each time for a minute.
    pub fn admit(
        &self,
        caller: &Caller,
        estimated_tokens: u64,
    ) -> Result<Admission, LimitExceeded> {
        let limits = caller.limits();
        if limits.is_unlimited() {
            return Ok(Admission::unlimited());
        }
        let now = Instant::now();
        let mut table = self.lock();
        let entry = table.entry(caller.shared_name(), now);
        Bucket::follow(&mut entry.tokens, limits.tokens_per_minute, now);
        Bucket::follow(&mut entry.requests, limits.requests_per_minute, now);

        let tokens = entry
            .tokens
            .as_ref()
            .map_or(0, |bucket| estimated_tokens.min(bucket.per_minute));
        let token_wait = entry
            .tokens
            .as_ref()
            .map_or(Duration::ZERO, |bucket| bucket.wait_for(tokens, now));
        let request_wait = entry
            .requests
            .as_ref()
            .map_or(Duration::ZERO, |bucket| bucket.wait_for(1, now));
        if !token_wait.is_zero() || !request_wait.is_zero() {
            let (kind, per_minute, wait) = if token_wait >= request_wait {
                (LimitKind::Tokens, limits.tokens_per_minute, token_wait)
            } else {
                (
                    LimitKind::Requests,
                    limits.requests_per_minute,
                    request_wait,
                )
            };
            return Err(LimitExceeded::new(
                caller.shared_name().clone(),
                kind,
                per_minute.unwrap_or_default(),
                wait,
            ));
        }

        if let Some(bucket) = &mut entry.requests {
            bucket.take(1, now);
        }
        let reservation = entry.tokens.as_mut().map(|bucket| {
            bucket.take(tokens, now);
            Reservation {
                limiter: self.clone(),
                caller: caller.shared_name().clone(),
                per_minute: bucket.per_minute,
                reserved: tokens,
            }
        });
        Ok(Admission { reservation })
    }

    /// Charges `caller` `tokens` used outside a request's answer, as they are reported: a
    /// Realtime session's responses, say (each `response.done` carries its usage). A caller
    /// without a tokens-per-minute limit is not charged. Its next requests wait out what this
    /// takes past the bucket's empty.
    pub fn charge(&self, caller: &Caller, tokens: u64) {
        if let Some(per_minute) = caller.limits().tokens_per_minute {
            self.adjust(caller.shared_name(), per_minute, 0, tokens);
        }
    }

    /// Charges `caller` what an answer used beyond what its admission reserved, or gives back
    /// what it reserved too much.
    fn adjust(&self, caller: &Arc<str>, per_minute: u64, reserved: u64, used: u64) {
        if used == reserved {
            return;
        }
        let now = Instant::now();
        let mut table = self.lock();
        // Swept while the answer ran (its bucket was full again): a full one takes its place.
        let bucket = table
            .entry(caller, now)
            .tokens
            .get_or_insert_with(|| Bucket::new(per_minute, now));
        if used > reserved {
            bucket.take(used - reserved, now);
        } else {
            bucket.give_back(reserved - used, now);
        }
    }

    /// The table, held briefly: no lock is held across an await, and nothing in it panics, so a
    /// poisoned lock (a panic elsewhere while it was held) still holds consistent buckets.
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for TokenLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenLimiter")
            .field("callers", &self.lock().callers.len())
            .finish()
    }
}

/// A request admitted by [`TokenLimiter::admit`], holding the tokens reserved for its prompt.
///
/// [`settle`](Self::settle) it with the answer's usage once known: the caller is charged what the
/// answer used instead of the estimate. Dropped unsettled (the answer carried no usage, failed,
/// or was abandoned), the estimate stands. As a [`UsageCallback`], it settles with the usage of
/// the [`UsageReport`] it receives: this is how [`TokenLimit`](super::TokenLimit) charges.
#[derive(Debug)]
#[must_use = "dropped at once, the estimate stands; settle it with the answer's usage"]
pub struct Admission {
    /// `None`: the caller has no token limit; nothing to settle.
    reservation: Option<Reservation>,
}

#[derive(Debug)]
struct Reservation {
    limiter: TokenLimiter,
    caller: Arc<str>,
    /// The limit when admitted: the bucket's size if it has to be made again when settling.
    per_minute: u64,
    reserved: u64,
}

impl Admission {
    /// An admission that reserved nothing and settles nothing.
    pub(crate) fn unlimited() -> Self {
        Self { reservation: None }
    }

    /// Whether settling needs the answer's usage (the caller has a token limit).
    pub(crate) fn wants_usage(&self) -> bool {
        self.reservation.is_some()
    }

    /// Charges the caller the answer's `total_tokens` instead of the estimate: the difference is
    /// taken from its bucket (which may go below empty: a debt that its next requests wait out)
    /// or given back. With `None` the estimate stands.
    pub fn settle(self, usage: Option<&Usage>) {
        if let (Some(reservation), Some(usage)) = (self.reservation, usage) {
            reservation.limiter.adjust(
                &reservation.caller,
                reservation.per_minute,
                reservation.reserved,
                usage.total_tokens,
            );
        }
    }
}

impl UsageCallback for Admission {
    fn on_report(self, report: UsageReport) {
        self.settle(report.usage.as_ref());
    }
}

struct Table {
    callers: HashMap<Arc<str>, Entry>,
    /// How many callers the table may hold before it is swept again.
    sweep_at: usize,
}

impl Default for Table {
    fn default() -> Self {
        Self {
            callers: HashMap::new(),
            sweep_at: MIN_SWEEP,
        }
    }
}

impl Table {
    /// The caller's entry; a new one when it has none (first sweeping the table if it has grown).
    fn entry(&mut self, caller: &Arc<str>, now: Instant) -> &mut Entry {
        if !self.callers.contains_key(caller) && self.callers.len() >= self.sweep_at {
            // A full bucket is what a new entry starts with: dropping it forgets nothing.
            self.callers.retain(|_, entry| !entry.is_full(now));
            self.sweep_at = (self.callers.len() * 2).max(MIN_SWEEP);
        }
        self.callers.entry(caller.clone()).or_default()
    }
}

#[derive(Default)]
struct Entry {
    tokens: Option<Bucket>,
    requests: Option<Bucket>,
}

impl Entry {
    fn is_full(&self, now: Instant) -> bool {
        [&self.tokens, &self.requests]
            .into_iter()
            .all(|bucket| bucket.as_ref().is_none_or(|bucket| bucket.full_at <= now))
    }
}

/// A bucket of `per_minute` units that refills evenly over a minute, kept as the instant it is
/// full again (the generic cell rate algorithm): at `now` it holds
/// `per_minute * (now + MINUTE - full_at) / MINUTE`, at most `per_minute`. Taking `n` units moves
/// `full_at` on by the time `n` units take to refill. No floating point: a wait rounded up to the
/// millisecond is never a nanosecond short.
struct Bucket {
    per_minute: u64,
    full_at: Instant,
}

impl Bucket {
    fn new(per_minute: u64, now: Instant) -> Self {
        Self {
            per_minute,
            full_at: now,
        }
    }

    /// Makes `bucket` follow the caller's current limit: a new limit starts full, a removed one
    /// is dropped, a changed one keeps the part of the minute left.
    fn follow(bucket: &mut Option<Self>, per_minute: Option<u64>, now: Instant) {
        match (bucket.as_mut(), per_minute) {
            (_, None) => *bucket = None,
            (Some(bucket), Some(per_minute)) => bucket.per_minute = per_minute,
            (None, Some(per_minute)) => *bucket = Some(Self::new(per_minute, now)),
        }
    }

    /// How long until the bucket holds `units` (at most `per_minute`); zero when it does.
    fn wait_for(&self, units: u64, now: Instant) -> Duration {
        if self.per_minute == 0 {
            return MINUTE;
        }
        let end = later(self.full_at.max(now), self.refill(units));
        end.saturating_duration_since(now + MINUTE)
    }

    fn take(&mut self, units: u64, now: Instant) {
        // Beyond a full bucket nothing is saved up: taking starts from `now` at the earliest.
        self.full_at = later(self.full_at.max(now), self.refill(units));
    }

    fn give_back(&mut self, units: u64, now: Instant) {
        // No fuller than full.
        self.full_at = self
            .full_at
            .checked_sub(self.refill(units))
            .map_or(now, |full_at| full_at.max(now));
    }

    /// The time `units` take to refill, rounded up to the nanosecond.
    fn refill(&self, units: u64) -> Duration {
        if self.per_minute == 0 {
            return Duration::ZERO;
        }
        let nanos = (u128::from(units) * MINUTE.as_nanos()).div_ceil(u128::from(self.per_minute));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

/// `at + by`; `at` itself in the unreachable case that this overflows the clock.
fn later(at: Instant, by: Duration) -> Instant {
    at.checked_add(by).unwrap_or(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CallerLimits;

    fn caller(name: &str, tokens_per_minute: u64) -> Caller {
        Caller::new(name).with_limits(CallerLimits {
            tokens_per_minute: Some(tokens_per_minute),
            requests_per_minute: None,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn idle_callers_are_swept_when_the_table_doubles() {
        let limiter = TokenLimiter::new();
        // Deep in debt: still owing when the others are full again.
        let _owing = limiter.admit(&caller("owing", 60), 60).unwrap();
        for i in 1..MIN_SWEEP {
            let _spent = limiter.admit(&caller(&format!("c{i}"), 60), 1).unwrap();
        }
        assert_eq!(limiter.lock().callers.len(), MIN_SWEEP);

        tokio::time::advance(Duration::from_secs(2)).await;
        let _newcomer = limiter.admit(&caller("newcomer", 60), 1).unwrap();
        let table = limiter.lock();
        let mut left: Vec<&str> = table.callers.keys().map(|name| &**name).collect();
        left.sort_unstable();
        assert_eq!(left, ["newcomer", "owing"]);
        assert_eq!(table.sweep_at, MIN_SWEEP);
    }

    #[tokio::test(start_paused = true)]
    async fn a_settlement_after_a_sweep_charges_a_full_bucket() {
        let limiter = TokenLimiter::new();
        let team = caller("team", 60);
        let admission = limiter.admit(&team, 10).unwrap();
        limiter.lock().callers.clear();
        admission.settle(Some(&Usage {
            total_tokens: 70,
            ..Usage::default()
        }));
        // 60 charged on a full bucket of 60: empty, the next token in a second.
        let refused = limiter.admit(&team, 1).unwrap_err();
        assert_eq!(refused.retry_after(), Duration::from_secs(1));
    }
}
