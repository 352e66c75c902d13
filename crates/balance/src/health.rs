//! Passive health: cooldowns learned from each attempt's [`Outcome`], and trial re-admission.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::Deployment;
use crate::classify::{Failure, Outcome};

/// How long a backend cools down after failing, and when.
///
/// A cooling backend receives no traffic. When its cooldown ends it is *on trial*: it gets one
/// request, the trial, while every other request goes to the backends that are available; the
/// trial's answer decides. A trial that succeeds (any answer that is neither a failure, a
/// throttle nor a refused credential: success, a final answer, a first 401) re-admits the
/// backend: it takes its share of traffic again, its consecutive failures and its failed
/// trials are reset. A trial that fails (5xx,
/// connect error, timeout: at once, whatever `failure_threshold` says) cools it again, for
/// `failure_cooldown` doubled for each consecutive failed trial, at most `max_cooldown`
/// (10 s, 20 s, 40 s, ... with the defaults). A trial answered 429 cools it for the 429's own
/// `Retry-After` (at most `max_cooldown`), not doubled, and leaves the count of failed trials as
/// it is. A trial whose caller goes away before it is answered (its response future dropped)
/// frees the slot: the next request is the trial. The trial is in flight from the moment it is
/// picked, including any wait for the backend's own readiness (a `ConcurrencyLimit` in its
/// stack), until its response head or error arrives.
///
/// A 429 to a request that names its [`Deployment`] cools the backend for that deployment only
/// (for its `Retry-After`, or `default_throttle_cooldown`, at most `max_cooldown`), with no
/// trial: when that time is over, requests for the deployment go to it again.
///
/// Answers to other requests (sent before the backend cooled down) never end a cooldown or a
/// trial; failures among them may lengthen a cooldown, never a trial in flight, and never count
/// as failed trials.
///
/// # Credentials that fail
///
/// A backend that refuses our credentials is out of rotation for `credential_cooldown`
/// (5 minutes by default; not capped by `max_cooldown`), with the cooling reason `credential`,
/// and one warning naming the backend and the status (never the credential):
///
/// - a 403 ([`Outcome::Forbidden`]: a missing role assignment, a network rule) cools it at once;
/// - a 401 ([`Outcome::Unauthorized`]) cools it when it is the backend's second 401 in a row.
///   The first one is the token-refresh case (the auth layer drops the token, the retry policy
///   retries once); a backend that answers 401 again, to a refreshed token, has a wrong
///   credential. `Balance` cannot see the token, so "in a row" means with no success (nor final
///   answer) from that backend in between, whichever requests carried them.
///
/// A success or a final answer (an answer to an authenticated request) resets the count of 401s.
/// A trial answered 401 or 403 by a backend whose credential failed cools it again for
/// `credential_cooldown` (not doubled; the count of failed trials is left as it is). A first
/// 401 answering a trial re-admits the backend, as before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthPolicy {
    /// The cooldown after a 429 that names no wait. Default: 10 s.
    pub default_throttle_cooldown: Duration,
    /// The longest cooldown, whatever a 429 asks for (Azure sends 86400 s when a daily quota is
    /// spent), and however many trials failed. Default: 5 minutes.
    pub max_cooldown: Duration,
    /// The cooldown after a connect error, an attempt timeout, or `failure_threshold` consecutive
    /// failures; doubled for each consecutive failed trial. Default: 10 s.
    pub failure_cooldown: Duration,
    /// How many consecutive 5xx (or broken exchanges) cool a backend down. Default: 3. (A
    /// failed trial cools it down at once.)
    pub failure_threshold: u32,
    /// The cooldown of a backend that refuses our credentials: a 403, or a second 401 in a row
    /// (see [Credentials that fail](#credentials-that-fail)). Not capped by `max_cooldown`.
    /// Default: 5 minutes.
    pub credential_cooldown: Duration,
}

impl HealthPolicy {
    /// The defaults listed on each field.
    pub const fn new() -> Self {
        Self {
            default_throttle_cooldown: Duration::from_secs(10),
            max_cooldown: Duration::from_secs(300),
            failure_cooldown: Duration::from_secs(10),
            failure_threshold: 3,
            credential_cooldown: Duration::from_secs(300),
        }
    }

    /// The cooldown after the `failed_trials`-th consecutive failed trial (0: not a trial).
    fn failure_cooldown_after(&self, failed_trials: u32) -> Duration {
        self.failure_cooldown
            .saturating_mul(2u32.saturating_pow(failed_trials.min(31)))
            .min(self.max_cooldown)
    }

    /// The cooldown after a 429 that asked for `retry_after` (or for nothing).
    fn throttle_cooldown(&self, retry_after: Option<Duration>) -> Duration {
        retry_after
            .unwrap_or(self.default_throttle_cooldown)
            .min(self.max_cooldown)
    }
}

impl Default for HealthPolicy {
    fn default() -> Self {
        Self::new()
    }
}

/// The retry-after of [`AllCoolingDown`](crate::AllCoolingDown) when no backend is available
/// and one of them is on trial with its trial in flight (and no cooling backend recovers
/// sooner): a trial answers within an attempt timeout, so callers come back shortly rather
/// than wait in `Balance`.
pub const TRIAL_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Where a backend stands, as a [`BackendSnapshot`] reports it.
///
/// Displayed as `available`, `cooling` or `trial`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackendState {
    /// It takes its share of traffic.
    Available,
    /// It gets no traffic until its cooldown ends (see
    /// [`cooling_down_for`](BackendSnapshot::cooling_down_for) and
    /// [`cooling_reason`](BackendSnapshot::cooling_reason)).
    Cooling,
    /// Its cooldown ended: it gets one request, the trial, whose answer re-admits it or cools it
    /// again. While the trial is `in_flight` it gets no other request.
    Trial {
        /// Whether the trial request has been sent and not answered yet.
        in_flight: bool,
    },
}

impl BackendState {
    /// `available`, `cooling` or `trial`.
    pub fn as_str(&self) -> &'static str {
        match self {
            BackendState::Available => "available",
            BackendState::Cooling => "cooling",
            BackendState::Trial { .. } => "trial",
        }
    }
}

impl fmt::Display for BackendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How many cooldowns a backend entered, by reason, since its pool was built (and, for a
/// backend that stayed across a reload, in the pools before: see
/// [`BalanceHealth::carry_over_from`](crate::BalanceHealth::carry_over_from)), as
/// [`BackendSnapshot::cooldowns`] reports them.
///
/// The reasons are those of [`BackendSnapshot::cooling_reason`]. A cooldown is counted once,
/// when it starts: when the backend goes from taking requests (available, or on trial) to
/// cooling, including a failed trial. A failure that lengthens a cooldown already running (an
/// answer to a request sent before it cooled) is not counted again. A 429 to a request for a
/// [`Deployment`] counts as `throttled` when it starts a cooldown of that deployment on the
/// backend (one the backend was not already serving out for that deployment), though the
/// backend itself stays available.
///
/// Counts only grow (a monotonic counter per reason, as for a Prometheus `_total`): read them
/// all with [`by_reason`](Self::by_reason).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CooldownCounts {
    /// After a 429 (whole backend, or one of its deployments).
    pub throttled: u64,
    /// After 5xx (or broken exchanges): `failure_threshold` in a row, or a failed trial.
    pub failed: u64,
    /// After an attempt timeout.
    pub timeout: u64,
    /// After a connect error.
    pub connect: u64,
    /// After a refused credential: a 403, or a second 401 in a row.
    pub credential: u64,
}

impl CooldownCounts {
    /// Every reason with its count, zeros included, always in this order: `throttled`,
    /// `failed`, `timeout`, `connect`, `credential` (the names
    /// [`cooling_reason`](BackendSnapshot::cooling_reason) uses).
    pub fn by_reason(&self) -> [(&'static str, u64); 5] {
        [
            ("throttled", self.throttled),
            ("failed", self.failed),
            ("timeout", self.timeout),
            ("connect", self.connect),
            ("credential", self.credential),
        ]
    }

    /// The cooldowns entered, whatever the reason.
    pub fn total(&self) -> u64 {
        self.by_reason().iter().map(|&(_, count)| count).sum()
    }
}

/// The state of one backend, as [`Balance::snapshot`](crate::Balance::snapshot) reports it.
///
/// The counts (`attempts`, `throttled`, `failed`, `retries`, `cooldowns`) only grow, and are
/// carried over to the same backend's next pool on a reload (see
/// [`BalanceHealth::carry_over_from`](crate::BalanceHealth::carry_over_from)): each can be
/// exported as a counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSnapshot {
    /// The backend's configured name.
    pub name: Arc<str>,
    /// Its position in the list.
    pub index: usize,
    /// Its tier: 1 is tried first; a backend of a later tier gets a request only when no
    /// backend of an earlier tier takes it.
    pub priority: u32,
    /// Its weight within its tier (smooth weighted round-robin).
    pub weight: u32,
    /// How long it still cools down; `None` when it takes traffic (available, or on trial).
    pub cooling_down_for: Option<Duration>,
    /// Failures since its last success.
    pub consecutive_failures: u32,
    /// Attempts it answered (or failed) so far.
    pub attempts: u64,
    /// How many of those were throttled (429).
    pub throttled: u64,
    /// How many of those failed (5xx, connect errors, timeouts).
    pub failed: u64,
    /// How many of those were retries: requests that carried a non-empty [`TriedBackends`]
    /// (the retry policy had already sent them to a backend, usually another one).
    ///
    /// [`TriedBackends`]: crate::TriedBackends
    pub retries: u64,
    /// How many cooldowns it entered so far, by reason.
    pub cooldowns: CooldownCounts,
    /// Available, cooling, or on trial.
    pub state: BackendState,
    /// Why it last cooled down, while it is cooling or on trial (`None` when available):
    /// `throttled` (429), `failed` (5xx or a broken exchange), `timeout`, `connect`, or
    /// `credential` (a 403, or a second 401 in a row).
    pub cooling_reason: Option<&'static str>,
    /// Consecutive trials that failed since it was last available (each doubles the next
    /// failure cooldown).
    pub failed_trials: u32,
    /// The deployments it offers, as callers name them; `None` when it serves every deployment
    /// (see [`BackendSpec::deployments`](crate::BackendSpec::deployments)).
    pub deployments: Option<Vec<Arc<str>>>,
    /// The deployments it is cooling down for (each after a 429 to a request for it), and for
    /// how long still; only those still cooling, in the order they started. These leave the
    /// backend's own [`state`](Self::state) as it is: it takes requests for other deployments.
    pub deployment_cooldowns: Vec<(Arc<str>, Duration)>,
}

/// The `gate` of a backend whose trial is in flight.
const TRIAL_IN_FLIGHT: u64 = u64::MAX;

/// What a pick may do with one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Send it the request: it is available.
    Available,
    /// Send it the request, which is its trial: the slot is claimed (and must be answered with
    /// `observe(.., trial = true)` or released with `release_trial`).
    Trial,
    /// It takes no request now: cooling, or its trial is in flight.
    Refused,
}

/// What an attempt was, beside its outcome, for [`BackendHealth::observe`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Attempt<'a> {
    /// It was this backend's trial, whose outcome re-admits it or cools it again.
    pub(crate) trial: bool,
    /// It was a retry: the request carried a non-empty [`TriedBackends`](crate::TriedBackends).
    pub(crate) retry: bool,
    /// The deployment the request was for, if it said; a 429 then cools the backend for that
    /// deployment only.
    pub(crate) deployment: Option<&'a Deployment>,
}

/// What [`BackendHealth::cool_deployment`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cooled {
    /// No cooldown for the deployment was running: one starts.
    Started,
    /// The one running ends later now.
    Lengthened,
    /// The one running ends as late or later already.
    Kept,
}

/// One backend's counters, shared by every clone of the `Balance`.
#[derive(Debug)]
pub(crate) struct BackendHealth {
    pub(crate) name: Arc<str>,
    pub(crate) priority: u32,
    pub(crate) weight: u32,
    /// The backend's admission state, one atomic so a pick reads one word:
    /// - 0: available;
    /// - [`TRIAL_IN_FLIGHT`]: on trial, the trial sent and not answered;
    /// - any other value: nanoseconds after `Clock::start` until which it cools down; once that
    ///   time has passed, on trial with no trial in flight (the first pick to claim it with a
    ///   compare-exchange to `TRIAL_IN_FLIGHT` sends the trial).
    gate: AtomicU64,
    /// Why it last cooled down (one of the `REASON_*`).
    cooling_reason: AtomicU8,
    /// Consecutive failed trials since it was last available.
    failed_trials: AtomicU32,
    consecutive_failures: AtomicU32,
    /// 401s since its last success or final answer.
    consecutive_unauthorized: AtomicU32,
    attempts: AtomicU64,
    throttled: AtomicU64,
    failed: AtomicU64,
    /// Attempts that were retries (see [`BackendSnapshot::retries`]).
    retries: AtomicU64,
    /// Cooldowns entered, indexed by `REASON_* - 1` (see [`CooldownCounts`]).
    cooldowns: [AtomicU64; REASONS],
    /// The deployments it offers (`None`: every one).
    deployments: Option<Box<[Arc<str>]>>,
    /// Whether `deployment_cooldowns` may hold an entry: read first, so a pick of a backend
    /// with no deployment cooling down takes no lock and reads no clock.
    has_deployment_cooldowns: AtomicBool,
    /// The deployments it cools down for, each with the time (`Clock` nanoseconds) its cooldown
    /// ends. Entries whose time has passed are removed by the next reader.
    deployment_cooldowns: Mutex<Vec<(Arc<str>, u64)>>,
}

const REASON_NONE: u8 = 0;
const REASON_THROTTLED: u8 = 1;
const REASON_FAILED: u8 = 2;
const REASON_TIMEOUT: u8 = 3;
const REASON_CONNECT: u8 = 4;
const REASON_CREDENTIAL: u8 = 5;
/// How many reasons there are (`REASON_NONE` aside).
const REASONS: usize = 5;

fn reason_code(outcome: &Outcome) -> u8 {
    match outcome {
        Outcome::Throttled { .. } => REASON_THROTTLED,
        Outcome::Failed(Failure::Timeout) => REASON_TIMEOUT,
        Outcome::Failed(Failure::Connect) => REASON_CONNECT,
        Outcome::Failed(_) => REASON_FAILED,
        Outcome::Unauthorized | Outcome::Forbidden => REASON_CREDENTIAL,
        Outcome::Success
        | Outcome::Final
        | Outcome::NotHere
        | Outcome::CredentialUnavailable { .. } => REASON_NONE,
    }
}

fn reason_name(code: u8) -> Option<&'static str> {
    match code {
        REASON_THROTTLED => Some("throttled"),
        REASON_FAILED => Some("failed"),
        REASON_TIMEOUT => Some("timeout"),
        REASON_CONNECT => Some("connect"),
        REASON_CREDENTIAL => Some("credential"),
        _ => None,
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl BackendHealth {
    /// Takes over the state of `previous` (the same backend in a pool being replaced): its
    /// cooldowns (moved from `previous`'s clock onto `clock`), counts (of attempts, throttles,
    /// failures, retries and cooldowns by reason: they go on growing) and reasons. A trial in
    /// flight there is owed again here.
    pub(crate) fn carry_over_from(&self, previous: &BackendHealth, from: &Clock, clock: &Clock) {
        let moved = |until: u64| -> u64 {
            let at = from.start + Duration::from_nanos(until);
            let here = at.saturating_duration_since(clock.start).as_nanos();
            // 1: a cooldown already over (0 would mean "available").
            u64::try_from(here).unwrap_or(u64::MAX - 1).max(1)
        };
        let gate = match previous.gate.load(Ordering::Relaxed) {
            0 => 0,
            TRIAL_IN_FLIGHT => 1,
            until => moved(until),
        };
        self.gate.store(gate, Ordering::Relaxed);
        let copy32 = |to: &AtomicU32, from: &AtomicU32| {
            to.store(from.load(Ordering::Relaxed), Ordering::Relaxed)
        };
        let copy64 = |to: &AtomicU64, from: &AtomicU64| {
            to.store(from.load(Ordering::Relaxed), Ordering::Relaxed)
        };
        self.cooling_reason.store(
            previous.cooling_reason.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        copy32(&self.failed_trials, &previous.failed_trials);
        copy32(&self.consecutive_failures, &previous.consecutive_failures);
        copy32(
            &self.consecutive_unauthorized,
            &previous.consecutive_unauthorized,
        );
        copy64(&self.attempts, &previous.attempts);
        copy64(&self.throttled, &previous.throttled);
        copy64(&self.failed, &previous.failed);
        copy64(&self.retries, &previous.retries);
        for (to, from) in self.cooldowns.iter().zip(&previous.cooldowns) {
            copy64(to, from);
        }
        let cooling: Vec<(Arc<str>, u64)> = previous
            .deployment_cooldowns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(name, until)| (name.clone(), moved(*until)))
            .collect();
        self.has_deployment_cooldowns
            .store(!cooling.is_empty(), Ordering::Relaxed);
        *self
            .deployment_cooldowns
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = cooling;
    }

    pub(crate) fn new(
        name: Arc<str>,
        priority: u32,
        weight: u32,
        deployments: Option<Box<[Arc<str>]>>,
    ) -> Self {
        Self {
            name,
            priority,
            weight,
            gate: AtomicU64::new(0),
            cooling_reason: AtomicU8::new(REASON_NONE),
            failed_trials: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            consecutive_unauthorized: AtomicU32::new(0),
            attempts: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            cooldowns: Default::default(),
            deployments,
            has_deployment_cooldowns: AtomicBool::new(false),
            deployment_cooldowns: Mutex::new(Vec::new()),
        }
    }

    /// Whether it offers `deployment`.
    pub(crate) fn offers(&self, deployment: &str) -> bool {
        self.deployments
            .as_ref()
            .is_none_or(|offered| offered.iter().any(|d| **d == *deployment))
    }

    /// Whether it offers `deployment`; any backend offers a request that names none.
    pub(crate) fn serves(&self, deployment: Option<&Deployment>) -> bool {
        deployment.is_none_or(|d| self.offers(d.as_str()))
    }

    /// Whether a request for `deployment` may go to it, as far as the deployment goes: any
    /// request without one; else if it offers the deployment and does not cool down for it.
    /// Reads one atomic (and no clock) when it cools down for no deployment.
    pub(crate) fn takes_deployment(
        &self,
        deployment: Option<&Deployment>,
        now: impl FnOnce() -> u64,
    ) -> bool {
        let Some(deployment) = deployment else {
            return true;
        };
        self.offers(deployment.as_str())
            && (!self.has_deployment_cooldowns.load(Ordering::Relaxed)
                || self
                    .deployment_recovery(deployment.as_str(), now())
                    .is_zero())
    }

    /// How long after `now` its cooldown for `deployment` ends (zero when it has none), removing
    /// the cooldowns that have ended.
    fn deployment_recovery(&self, deployment: &str, now: u64) -> Duration {
        if !self.has_deployment_cooldowns.load(Ordering::Relaxed) {
            return Duration::ZERO;
        }
        let mut cooldowns = self
            .deployment_cooldowns
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        cooldowns.retain(|&(_, until)| until > now);
        if cooldowns.is_empty() {
            // Under the lock, so a cooldown being added is never hidden.
            self.has_deployment_cooldowns
                .store(false, Ordering::Relaxed);
        }
        cooldowns
            .iter()
            .find(|(d, _)| **d == *deployment)
            .map_or(Duration::ZERO, |&(_, until)| {
                Duration::from_nanos(until - now)
            })
    }

    /// Whether it may hold a cooldown for a deployment (one that has ended is forgotten by the
    /// next pick that looks).
    #[cfg(test)]
    pub(crate) fn cools_any_deployment(&self) -> bool {
        self.has_deployment_cooldowns.load(Ordering::Relaxed)
    }

    /// Cools it down for `deployment` until `until` (never shortening a cooldown); whether that
    /// started one (none was running at `now`), lengthened one, or left it as it was.
    fn cool_deployment(&self, deployment: &Arc<str>, now: u64, until: u64) -> Cooled {
        let mut cooldowns = self
            .deployment_cooldowns
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.has_deployment_cooldowns.store(true, Ordering::Relaxed);
        match cooldowns.iter_mut().find(|(d, _)| **d == **deployment) {
            Some((_, current)) if *current >= until => Cooled::Kept,
            Some((_, current)) => {
                // An entry whose time has passed (not removed yet) is a cooldown that ended.
                let cooled = if *current > now {
                    Cooled::Lengthened
                } else {
                    Cooled::Started
                };
                *current = until;
                cooled
            }
            None => {
                cooldowns.push((deployment.clone(), until));
                Cooled::Started
            }
        }
    }

    /// Counts a cooldown that starts, for `reason` (one of the `REASON_*`).
    fn count_cooldown(&self, reason: u8) {
        if let Some(count) = usize::from(reason)
            .checked_sub(1)
            .and_then(|i| self.cooldowns.get(i))
        {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How long after `now` it takes a request for `deployment` again (see
    /// [`recovery`](Self::recovery)): the later of its own recovery and the end of its cooldown
    /// for the deployment.
    pub(crate) fn recovery_for(&self, deployment: Option<&Deployment>, now: u64) -> Duration {
        let own = self.recovery(now);
        match deployment {
            Some(deployment) => own.max(self.deployment_recovery(deployment.as_str(), now)),
            None => own,
        }
    }

    /// Whether it would take a request at `now` (available, or on trial with no trial in
    /// flight), without claiming anything. `now` is read only if the backend has been cooling.
    pub(crate) fn is_available(&self, now: impl FnOnce() -> u64) -> bool {
        match self.gate.load(Ordering::Relaxed) {
            0 => true,
            TRIAL_IN_FLIGHT => false,
            until => until <= now(),
        }
    }

    /// Whether it takes this request: the usual pick reads one atomic and no clock. A backend
    /// whose cooldown is over is claimed for its trial (one compare-exchange; one caller wins).
    pub(crate) fn admit(&self, now: impl Fn() -> u64) -> Admission {
        let mut gate = self.gate.load(Ordering::Relaxed);
        loop {
            match gate {
                0 => return Admission::Available,
                TRIAL_IN_FLIGHT => return Admission::Refused,
                until if until > now() => return Admission::Refused,
                until => match self.gate.compare_exchange_weak(
                    until,
                    TRIAL_IN_FLIGHT,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        tracing::info!(
                            backend = %self.name,
                            "backend on trial: sending it one request"
                        );
                        return Admission::Trial;
                    }
                    Err(actual) => gate = actual,
                },
            }
        }
    }

    /// Frees the trial slot of a trial that will never be answered (its caller went away): the
    /// backend stays on trial, and the next pick sends the trial.
    pub(crate) fn release_trial(&self) {
        // 1: a cooldown that ended at the clock's first nanosecond, i.e. over.
        let _ =
            self.gate
                .compare_exchange(TRIAL_IN_FLIGHT, 1, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// How long after `now` it takes a request again: `Some(ZERO)` when it does at `now`,
    /// [`TRIAL_RETRY_AFTER`] while its trial is in flight.
    pub(crate) fn recovery(&self, now: u64) -> Duration {
        match self.gate.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            TRIAL_IN_FLIGHT => TRIAL_RETRY_AFTER,
            until => Duration::from_nanos(until.saturating_sub(now)),
        }
    }

    /// Learns from one attempt's outcome; the clock is read only to start a cooldown. See
    /// [`Attempt`] for what the attempt was.
    pub(crate) fn observe(
        &self,
        index: usize,
        outcome: &Outcome,
        policy: &HealthPolicy,
        clock: &Clock,
        attempt: Attempt<'_>,
    ) {
        let Attempt {
            trial,
            retry,
            deployment,
        } = attempt;
        if matches!(outcome, Outcome::CredentialUnavailable { .. }) {
            // The backend never saw the request: nothing learnt, and a trial is still owed.
            if trial {
                self.release_trial();
            }
            return;
        }
        self.attempts.fetch_add(1, Ordering::Relaxed);
        if retry {
            self.retries.fetch_add(1, Ordering::Relaxed);
        }
        if let (Outcome::Throttled { retry_after }, Some(deployment)) = (outcome, deployment) {
            self.observe_deployment_throttled(
                index,
                *retry_after,
                policy,
                clock,
                trial,
                deployment,
            );
            return;
        }
        let cooldown = match *outcome {
            Outcome::CredentialUnavailable { .. } => return,
            Outcome::Forbidden => policy.credential_cooldown,
            Outcome::Unauthorized
                if self
                    .consecutive_unauthorized
                    .fetch_add(1, Ordering::Relaxed)
                    >= 1 =>
            {
                // The second 401 in a row: a refreshed token was refused too.
                policy.credential_cooldown
            }
            Outcome::Success | Outcome::Final | Outcome::NotHere | Outcome::Unauthorized => {
                if !matches!(outcome, Outcome::Unauthorized) {
                    self.consecutive_unauthorized.store(0, Ordering::Relaxed);
                }
                self.consecutive_failures.store(0, Ordering::Relaxed);
                if trial {
                    self.failed_trials.store(0, Ordering::Relaxed);
                    self.gate.store(0, Ordering::Relaxed);
                    tracing::info!(
                        backend = %self.name,
                        index,
                        reason = outcome.reason(),
                        "backend re-admitted after its trial"
                    );
                }
                return;
            }
            Outcome::Throttled { retry_after } => {
                self.throttled.fetch_add(1, Ordering::Relaxed);
                policy.throttle_cooldown(retry_after)
            }
            Outcome::Failed(failure) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
                if trial {
                    let failed_trials = self.failed_trials.fetch_add(1, Ordering::Relaxed) + 1;
                    policy.failure_cooldown_after(failed_trials)
                } else {
                    let at_once = matches!(failure, Failure::Connect | Failure::Timeout);
                    if !at_once && failures < policy.failure_threshold {
                        return;
                    }
                    policy.failure_cooldown_after(0)
                }
            }
        };
        let now = clock.now();
        let until = now
            .saturating_add(u64::try_from(cooldown.as_nanos()).unwrap_or(u64::MAX))
            .min(TRIAL_IN_FLIGHT - 1);
        let (started, was_cooling) = if trial {
            // Only the trial's holder moves the gate off `TRIAL_IN_FLIGHT` (other attempts'
            // `fetch_max` leave it there).
            self.gate.store(until, Ordering::Relaxed);
            (true, false)
        } else {
            // Never shortens a cooldown, never touches a trial in flight.
            let previous = self.gate.fetch_max(until, Ordering::Relaxed);
            (previous < until, previous > now)
        };
        if !started {
            return;
        }
        let reason = reason_code(outcome);
        if !was_cooling {
            // It took requests until now (available, or on trial): a cooldown starts.
            self.count_cooldown(reason);
        }
        let previous_reason = self.cooling_reason.swap(reason, Ordering::Relaxed);
        if reason == REASON_CREDENTIAL {
            // One warning per cooldown: not again for the other 401s and 403s in flight.
            if !(was_cooling && previous_reason == REASON_CREDENTIAL) {
                let status: u16 = if matches!(outcome, Outcome::Forbidden) {
                    403
                } else {
                    401
                };
                tracing::warn!(
                    backend = %self.name,
                    index,
                    status,
                    cooldown_ms = millis(cooldown),
                    trial,
                    "backend refused our credentials: out of rotation"
                );
            }
        } else {
            tracing::warn!(
                backend = %self.name,
                index,
                reason = outcome.reason(),
                cooldown_ms = millis(cooldown),
                trial,
                "backend cooling down"
            );
        }
    }

    /// A 429 to a request for `deployment`: the backend answered (so a trial re-admits it), and
    /// cools down for that deployment only, for the 429's `Retry-After` (at most
    /// `max_cooldown`).
    fn observe_deployment_throttled(
        &self,
        index: usize,
        retry_after: Option<Duration>,
        policy: &HealthPolicy,
        clock: &Clock,
        trial: bool,
        deployment: &Deployment,
    ) {
        self.throttled.fetch_add(1, Ordering::Relaxed);
        if trial {
            self.failed_trials.store(0, Ordering::Relaxed);
            self.gate.store(0, Ordering::Relaxed);
            tracing::info!(
                backend = %self.name,
                index,
                reason = "throttled",
                deployment = deployment.as_str(),
                "backend re-admitted after its trial"
            );
        }
        let cooldown = policy.throttle_cooldown(retry_after);
        let now = clock.now();
        let until = now.saturating_add(u64::try_from(cooldown.as_nanos()).unwrap_or(u64::MAX));
        let cooled = self.cool_deployment(deployment.name(), now, until);
        if cooled == Cooled::Started {
            self.count_cooldown(REASON_THROTTLED);
        }
        if cooled != Cooled::Kept {
            tracing::warn!(
                backend = %self.name,
                index,
                deployment = deployment.as_str(),
                reason = "throttled",
                cooldown_ms = millis(cooldown),
                trial,
                "deployment cooling down on this backend"
            );
        }
    }

    pub(crate) fn snapshot(&self, index: usize, now: u64) -> BackendSnapshot {
        let (state, cooling_down_for) = match self.gate.load(Ordering::Relaxed) {
            0 => (BackendState::Available, None),
            TRIAL_IN_FLIGHT => (BackendState::Trial { in_flight: true }, None),
            until if until > now => (
                BackendState::Cooling,
                Some(Duration::from_nanos(until - now)),
            ),
            _ => (BackendState::Trial { in_flight: false }, None),
        };
        BackendSnapshot {
            name: self.name.clone(),
            index,
            priority: self.priority,
            weight: self.weight,
            cooling_down_for,
            consecutive_failures: self.consecutive_failures.load(Ordering::Relaxed),
            attempts: self.attempts.load(Ordering::Relaxed),
            throttled: self.throttled.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            cooldowns: {
                let count =
                    |reason: u8| self.cooldowns[usize::from(reason - 1)].load(Ordering::Relaxed);
                CooldownCounts {
                    throttled: count(REASON_THROTTLED),
                    failed: count(REASON_FAILED),
                    timeout: count(REASON_TIMEOUT),
                    connect: count(REASON_CONNECT),
                    credential: count(REASON_CREDENTIAL),
                }
            },
            state,
            cooling_reason: match state {
                BackendState::Available => None,
                _ => reason_name(self.cooling_reason.load(Ordering::Relaxed)),
            },
            failed_trials: self.failed_trials.load(Ordering::Relaxed),
            deployments: self.deployments.as_ref().map(|d| d.to_vec()),
            deployment_cooldowns: self
                .deployment_cooldowns
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .filter(|&&(_, until)| until > now)
                .map(|(d, until)| (d.clone(), Duration::from_nanos(until - now)))
                .collect(),
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
