//! Passive health: cooldowns learned from each attempt's [`Outcome`].

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::classify::{Failure, Outcome};

/// How long a backend cools down after failing, and when.
///
/// A cooling backend receives no traffic; when its cooldown ends it gets traffic again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthPolicy {
    /// The cooldown after a 429 that names no wait. Default: 10 s.
    pub default_throttle_cooldown: Duration,
    /// The longest cooldown, whatever a 429 asks for (Azure sends 86400 s when a daily quota is
    /// spent). Default: 5 minutes.
    pub max_cooldown: Duration,
    /// The cooldown after a connect error, an attempt timeout, or `failure_threshold` consecutive
    /// failures. Default: 10 s.
    pub failure_cooldown: Duration,
    /// How many consecutive 5xx (or broken exchanges) cool a backend down. Default: 3.
    pub failure_threshold: u32,
}

impl HealthPolicy {
    /// The defaults listed on each field.
    pub const fn new() -> Self {
        Self {
            default_throttle_cooldown: Duration::from_secs(10),
            max_cooldown: Duration::from_secs(300),
            failure_cooldown: Duration::from_secs(10),
            failure_threshold: 3,
        }
    }
}

impl Default for HealthPolicy {
    fn default() -> Self {
        Self::new()
    }
}

/// The state of one backend, as [`Balance::snapshot`](crate::Balance::snapshot) reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSnapshot {
    /// The backend's configured name.
    pub name: Arc<str>,
    /// Its position in the list.
    pub index: usize,
    /// How long it still cools down; `None` when it takes traffic.
    pub cooling_down_for: Option<Duration>,
    /// Failures since its last success.
    pub consecutive_failures: u32,
    /// Attempts it answered (or failed) so far.
    pub attempts: u64,
    /// How many of those were throttled (429).
    pub throttled: u64,
    /// How many of those failed (5xx, connect errors, timeouts).
    pub failed: u64,
}

/// One backend's counters, shared by every clone of the `Balance`.
#[derive(Debug)]
pub(crate) struct BackendHealth {
    pub(crate) name: Arc<str>,
    /// Nanoseconds after `Clock::start` until which the backend cools down; 0: not cooling.
    cooling_until: AtomicU64,
    consecutive_failures: AtomicU32,
    attempts: AtomicU64,
    throttled: AtomicU64,
    failed: AtomicU64,
}

impl BackendHealth {
    pub(crate) fn new(name: Arc<str>) -> Self {
        Self {
            name,
            cooling_until: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            attempts: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    /// Nanoseconds (on the balance's clock) until which this backend cools down.
    pub(crate) fn cooling_until(&self) -> u64 {
        self.cooling_until.load(Ordering::Relaxed)
    }

    /// Whether it takes traffic at `now`, read from `now` only if the backend has been cooling
    /// down: the usual pick reads no clock. A cooldown found over is cleared (unless a new one
    /// was set meanwhile), so the next pick reads no clock either.
    pub(crate) fn is_available(&self, now: impl FnOnce() -> u64) -> bool {
        let until = self.cooling_until();
        if until == 0 {
            return true;
        }
        if until <= now() {
            let _ =
                self.cooling_until
                    .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Learns from one attempt's outcome; the clock is read only to start a cooldown.
    pub(crate) fn observe(
        &self,
        index: usize,
        outcome: &Outcome,
        policy: &HealthPolicy,
        clock: &Clock,
    ) {
        self.attempts.fetch_add(1, Ordering::Relaxed);
        let cooldown = match *outcome {
            Outcome::Success | Outcome::Final | Outcome::Unauthorized => {
                self.consecutive_failures.store(0, Ordering::Relaxed);
                return;
            }
            Outcome::Throttled { retry_after } => {
                self.throttled.fetch_add(1, Ordering::Relaxed);
                retry_after
                    .unwrap_or(policy.default_throttle_cooldown)
                    .min(policy.max_cooldown)
            }
            Outcome::Failed(failure) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
                let at_once = matches!(failure, Failure::Connect | Failure::Timeout);
                if !at_once && failures < policy.failure_threshold {
                    return;
                }
                policy.failure_cooldown.min(policy.max_cooldown)
            }
        };
        let until = clock
            .now()
            .saturating_add(u64::try_from(cooldown.as_nanos()).unwrap_or(u64::MAX));
        let previous = self.cooling_until.fetch_max(until, Ordering::Relaxed);
        if previous < until {
            tracing::warn!(
                backend = %self.name,
                index,
                reason = outcome.reason(),
                cooldown_ms = u64::try_from(cooldown.as_millis()).unwrap_or(u64::MAX),
                "backend cooling down"
            );
        }
    }

    pub(crate) fn snapshot(&self, index: usize, now: u64) -> BackendSnapshot {
        let until = self.cooling_until();
        BackendSnapshot {
            name: self.name.clone(),
            index,
            cooling_down_for: (until > now).then(|| Duration::from_nanos(until - now)),
            consecutive_failures: self.consecutive_failures.load(Ordering::Relaxed),
            attempts: self.attempts.load(Ordering::Relaxed),
            throttled: self.throttled.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }
}

/// A monotonic clock in nanoseconds since the balance was built (tokio's, so paused-time tests
/// drive it).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    start: Instant,
}

impl Clock {
    pub(crate) fn new() -> Self {
        // One nanosecond before now, so that `now()` is never 0, the "not cooling" mark.
        let now = Instant::now();
        Self {
            start: now.checked_sub(Duration::from_nanos(1)).unwrap_or(now),
        }
    }

    pub(crate) fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A [`Clock`] reading taken on first use and kept: one pick reads the clock at most once, and
/// not at all when no backend has been cooling down.
pub(crate) struct LazyNow<'a> {
    clock: &'a Clock,
    now: Cell<Option<u64>>,
}

impl<'a> LazyNow<'a> {
    pub(crate) fn new(clock: &'a Clock) -> Self {
        Self {
            clock,
            now: Cell::new(None),
        }
    }

    pub(crate) fn get(&self) -> u64 {
        if let Some(now) = self.now.get() {
            return now;
        }
        let now = self.clock.now();
        self.now.set(Some(now));
        now
    }
}
