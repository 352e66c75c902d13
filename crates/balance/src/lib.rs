//! Round-robin balancing over named backend services, in priority tiers, with weights and
//! passive health.
//!
//! [`Balance`] spreads requests over a list of backends (each a full tower stack of its own:
//! auth, timeout, upstream). Each backend has a priority (its tier: 1 first) and a weight
//! ([`BackendSpec`]; both 1 by default). A request goes to the best tier that has a backend
//! that takes it, never to a later tier while an earlier one can take it: when every backend
//! of a tier is cooling down (or on trial with its trial in flight), requests and retries spill
//! to the next tier, and come back as soon as one of them takes requests again (its trial
//! first). Within a tier, backends of equal weight take turns in strict rotation; unequal
//! weights share by nginx's smooth weighted round-robin (weights 3 and 1 give a a b a, a a b a,
//! ...: deterministic, interleaved), and a backend that takes no request is left out of that
//! pick. Each deployment has its own rotation (in a small mutex per tier), so requests for two
//! deployments sent in turn each reach every backend. It learns from every
//! answer: a backend that throttles (429) cools down for as long as its `Retry-After` asks; one
//! that cannot be reached, or times out, cools down at once; one that fails with 5xx several
//! times in a row cools down too. A cooling backend gets no traffic until its cooldown ends;
//! then it is *on trial*: it gets one request, while every other request goes to the backends
//! that are well, and that request's answer re-admits it or cools it again, for twice as long
//! after each failed trial (up to a cap; a 429 keeps its own `Retry-After`). So a hung backend
//! gets one request per cooldown, not a burst. A backend that refuses our credentials (a 403,
//! or a second 401 in a row) is out for a long cooldown (5 minutes). See [`HealthPolicy`].
//!
//! Health is per deployment where quotas are: a request may say which deployment it is for
//! (a [`Deployment`] request extension, set by a layer above). A 429 to such a request cools
//! only that deployment on that backend, for the 429's `Retry-After`: requests for the
//! backend's other deployments keep going to it. Connect errors, timeouts, repeated 5xx and
//! refused credentials still cool the whole backend. A backend may serve only some
//! deployments ([`BackendSpec::deployments`]): a request for another never goes to it, and a
//! request for a deployment no backend serves fails at once with [`UnknownDeployment`]. A
//! request without a `Deployment` is for any deployment: every backend takes it, and a 429 to
//! it cools the whole backend.
//!
//! It knows nothing of Azure beyond the default [`Classify`] rules; it works for any HTTP
//! backends.
//!
//! # Example
//!
//! ```
//! use aoai_balance::{Balance, ServedBy};
//! use http::{Request, Response};
//! use std::convert::Infallible;
//! use tower::{service_fn, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! let backend = |name: &'static str| {
//!     service_fn(move |_req: Request<String>| async move {
//!         Ok::<_, Infallible>(Response::new(format!("hello from {name}")))
//!     })
//! };
//! let balance = Balance::new([("east", backend("east")), ("west", backend("west"))]);
//!
//! let first = balance.clone().oneshot(Request::new(String::new())).await?;
//! let second = balance.clone().oneshot(Request::new(String::new())).await?;
//! assert_eq!(first.extensions().get::<ServedBy>().unwrap().name(), "east");
//! assert_eq!(second.extensions().get::<ServedBy>().unwrap().name(), "west");
//! # Ok(())
//! # }
//! ```
//!
//! # Contracts
//!
//! - Every response carries a [`ServedBy`] extension (and the request's [`Deployment`], when it
//!   had one); every error is a [`BackendError`] naming the backend (or [`AllCoolingDown`] /
//!   [`UnknownDeployment`] / [`NoBackends`] when none was contacted).
//! - A request carrying a [`Deployment`] goes only to a backend that offers it and does not
//!   cool down for it, and a 429 to it cools only that pair (backend, deployment): no trial,
//!   the pair takes requests again when its `Retry-After` (at most `max_cooldown`) is over. A
//!   backend on trial whose trial is answered 429 for a deployment is re-admitted (it answered)
//!   and cools for that deployment. A backend with no deployment cooling down costs a pick one
//!   more atomic read; names are compared exactly. Requests without a `Deployment` ignore
//!   per-deployment cooldowns and offered deployments.
//! - A request carrying a [`PinnedTo`] extension goes to that backend, whatever its health (an
//!   object such as a stored response lives there and nowhere else).
//! - A request carrying [`SeekObject`] (it looks for an object one backend holds) goes, once
//!   every backend that takes traffic was tried, to one not tried yet whatever its health.
//! - A request carrying a [`TriedBackends`] extension goes to an untried backend that takes it
//!   while one exists, tiers in priority order (an untried one of tier 2 before a tried one of
//!   tier 1); else, in the best tier that has a backend that takes it, round-robin on after the
//!   last one tried.
//! - A backend is *available*, *cooling* (no request), or *on trial* ([`BackendState`]). A
//!   backend on trial takes exactly one request, the trial, claimed by one compare-exchange; while
//!   the trial is in flight it takes no other. The trial's answer settles it: success, a final
//!   answer or a first 401 re-admit it; a failure (5xx, connect error, timeout) cools it again at once,
//!   `failure_cooldown` doubled per consecutive failed trial, at most `max_cooldown`; a 429 cools
//!   it for its own `Retry-After` (at most `max_cooldown`). A trial whose response future is
//!   dropped unanswered frees the slot: the next request is the trial.
//! - When no backend takes a request (each is cooling, or on trial with its trial in flight;
//!   for a request for a [`Deployment`], each backend that offers it is, or cools down for the
//!   deployment), the call fails at once with [`AllCoolingDown`], without contacting any
//!   backend and without waiting. It carries the soonest recovery: the least of the cooling
//!   backends' time left (for a deployment, each backend's the later of its own and the
//!   deployment's) and, if a trial is in flight, [`TRIAL_RETRY_AFTER`] (1 s: a trial answers
//!   within an attempt timeout). [`BalanceHealth::soonest_recovery_for`] and
//!   [`BalanceHealth::has_untried_available_for`], given the request's deployment, count the
//!   same way, so the retry policy agrees with the pick (`soonest_recovery` and
//!   `has_untried_available` are the same for a request for any deployment).
//! - A 403 ([`Outcome::Forbidden`]), or a backend's second 401 ([`Outcome::Unauthorized`]) with
//!   no success or final answer from it in between, takes the backend out for
//!   [`HealthPolicy::credential_cooldown`], with one warning naming it and the status. The first
//!   401 is left to the token refresh (see [`HealthPolicy`]).
//! - [`Balance::snapshot`] reports each backend's priority, weight, [`BackendState`], why it
//!   cools (`throttled`, `failed`, `timeout`, `connect`, `credential`), the time left, its
//!   failed trials, the deployments it offers and those it cools down for (with the time left),
//!   and counters that only grow: attempts, throttles, failures, retries (attempts that carried
//!   a non-empty [`TriedBackends`]) and cooldowns entered by reason ([`CooldownCounts`]); relaxed
//!   atomics, updated where each event happens, cheap to read at scrape time.
//! - [`Classify`] decides each outcome; give the retry policy the same classifier.
//! - Each call drives a clone of its backend with tower's [`Oneshot`](tower::util::Oneshot):
//!   a backend's readiness is awaited with the caller's own task, so limits inside a backend's
//!   stack (`ConcurrencyLimit`, `Buffer`, `RateLimit` behind a `Buffer`, `Timeout`) hold and
//!   every call waiting on them completes.

#![forbid(unsafe_code)]

pub mod classify;
pub mod error;
mod extensions;
pub mod future;
mod health;
mod tier;

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use tower::{BoxError, Service, ServiceExt};

pub use crate::classify::{AzureOpenAiClassifier, Classify, Failure, Outcome};
pub use crate::error::{AllCoolingDown, BackendError, NoBackends, UnknownDeployment};
pub use crate::extensions::{Deployment, PinnedTo, SeekObject, ServedBy, TriedBackends};
pub use crate::future::ResponseFuture;
pub use crate::health::{
    BackendSnapshot, BackendState, CooldownCounts, HealthPolicy, TRIAL_RETRY_AFTER,
};

use crate::health::{BackendHealth, Clock, LazyNow};
use crate::tier::Tier;

/// Round-robin over named backend services in priority tiers, with weights, skipping those
/// that cool down (see the [crate docs](crate)).
///
/// # Clone and readiness
///
/// `Balance` is cheap to clone; clones share the rotations and the health of every backend.
/// The backend is chosen in `call`, from the request (which may say which backends were already
/// tried), so `poll_ready` is always ready and reserves nothing. `call` clones the chosen
/// backend and drives the clone with [`Oneshot`](tower::util::Oneshot), which awaits the
/// clone's readiness with the calling task's own context and then calls it (as tower-http's
/// `FollowRedirect` does). Backends must therefore be `Clone`, and their clones must share
/// whatever limits them: tower's `ConcurrencyLimit` and `Buffer` do; a service that is not
/// `Clone`, or whose clones would each keep a limit of their own (tower's `RateLimit`), goes
/// behind a [`Buffer`](tower::buffer::Buffer).
pub struct Balance<S, C = AzureOpenAiClassifier> {
    // One reference count for the services and the health together: a clone (one per request,
    // in the retry layer) touches one.
    inner: Arc<Inner<S>>,
    classifier: C,
}

/// What every clone of a [`Balance`] shares.
struct Inner<S> {
    services: Box<[S]>,
    shared: Arc<Shared>,
}

/// The state every clone shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) backends: Box<[BackendHealth]>,
    /// The backends grouped by priority, best first.
    tiers: Box<[Tier]>,
    pub(crate) policy: HealthPolicy,
    pub(crate) clock: Clock,
}

/// One backend of a [`Balance`], with its place in the rotation: its priority (tier) and its
/// weight within the tier. Give a list of them to [`Balance::with_backends`].
///
/// ```
/// use aoai_balance::{AzureOpenAiClassifier, Balance, BackendSpec, HealthPolicy};
/// # use http::{Request, Response};
/// # use std::convert::Infallible;
/// # let backend = || tower::service_fn(|_req: Request<String>| async {
/// #     Ok::<_, Infallible>(Response::new(String::new()))
/// # });
/// // Two provisioned (PTU) deployments sharing 3:1, spilling over to pay-as-you-go.
/// let balance = Balance::with_backends(
///     [
///         BackendSpec::new("ptu-east", backend()).weight(3),
///         BackendSpec::new("ptu-west", backend()),
///         // Pay-as-you-go serves only two deployments: requests for others never go there.
///         BackendSpec::new("paygo", backend())
///             .priority(2)
///             .deployments(["gpt-4o", "text-embedding-3-small"]),
///     ],
///     HealthPolicy::new(),
///     AzureOpenAiClassifier,
/// );
/// assert_eq!(balance.snapshot()[2].priority, 2);
/// assert_eq!(balance.snapshot()[2].deployments.as_ref().unwrap().len(), 2);
/// ```
#[derive(Debug, Clone)]
pub struct BackendSpec<S> {
    name: Arc<str>,
    service: S,
    priority: u32,
    weight: u32,
    deployments: Option<Box<[Arc<str>]>>,
}

impl<S> BackendSpec<S> {
    /// A backend of priority 1 and weight 1.
    pub fn new(name: impl Into<Arc<str>>, service: S) -> Self {
        Self {
            name: name.into(),
            service,
            priority: 1,
            weight: 1,
            deployments: None,
        }
    }

    /// Its tier: 1 first (the default), then 2, and so on (any order of numbers works: lower
    /// first). A backend gets a request only when no backend of a better tier takes it.
    #[must_use]
    pub fn priority(mut self, priority: u32) -> Self {
        self.priority = priority;
        self
    }

    /// Its share of its tier's traffic, relative to the other backends of the tier (default 1;
    /// 0 is taken as 1).
    #[must_use]
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight.max(1);
        self
    }

    /// The deployments it serves, as callers name them (the [`Deployment`] a request carries):
    /// a request for any other deployment never goes to it. Without this (the default), it
    /// serves every deployment. (Mapping the caller's names onto the backend's own is for its
    /// service to do.)
    #[must_use]
    pub fn deployments<I>(mut self, deployments: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<Arc<str>>,
    {
        self.deployments = Some(deployments.into_iter().map(Into::into).collect());
        self
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The deployments it serves; `None`: every deployment.
    pub fn offered_deployments(&self) -> Option<&[Arc<str>]> {
        self.deployments.as_deref()
    }

    /// Its service.
    pub fn service(&self) -> &S {
        &self.service
    }
}

impl<N: Into<Arc<str>>, S> From<(N, S)> for BackendSpec<S> {
    fn from((name, service): (N, S)) -> Self {
        Self::new(name, service)
    }
}

impl<S> Balance<S> {
    /// Balances over `backends`, `(name, service)` pairs, with the default [`HealthPolicy`]
    /// and [`AzureOpenAiClassifier`].
    pub fn new<N, I>(backends: I) -> Self
    where
        I: IntoIterator<Item = (N, S)>,
        N: Into<Arc<str>>,
    {
        Self::with_policy(backends, HealthPolicy::new(), AzureOpenAiClassifier)
    }
}

impl<S, C> Balance<S, C> {
    /// Balances over `backends`, `(name, service)` pairs all of priority 1 and weight 1, with
    /// the given health policy and classifier.
    pub fn with_policy<N, I>(backends: I, policy: HealthPolicy, classifier: C) -> Self
    where
        I: IntoIterator<Item = (N, S)>,
        N: Into<Arc<str>>,
    {
        Self::with_backends(
            backends.into_iter().map(BackendSpec::from),
            policy,
            classifier,
        )
    }

    /// Balances over `backends`, each with its priority and weight (see [`BackendSpec`]), with
    /// the given health policy and classifier. A backend's index (in [`ServedBy`],
    /// [`TriedBackends`] and the snapshot) is its position in `backends`, whatever its tier.
    pub fn with_backends<I>(backends: I, policy: HealthPolicy, classifier: C) -> Self
    where
        I: IntoIterator<Item = BackendSpec<S>>,
    {
        let (health, services): (Vec<BackendHealth>, Vec<S>) = backends
            .into_iter()
            .map(|spec| {
                (
                    BackendHealth::new(spec.name, spec.priority, spec.weight, spec.deployments),
                    spec.service,
                )
            })
            .unzip();
        let tiers = Tier::build(&health);
        Self {
            inner: Arc::new(Inner {
                services: services.into(),
                shared: Arc::new(Shared {
                    backends: health.into(),
                    tiers,
                    policy,
                    clock: Clock::new(),
                }),
            }),
            classifier,
        }
    }

    /// The backend services, in order.
    pub fn get_ref(&self) -> &[S] {
        &self.inner.services
    }

    /// The classifier.
    pub fn classifier(&self) -> &C {
        &self.classifier
    }

    /// The health policy.
    pub fn policy(&self) -> &HealthPolicy {
        &self.inner.shared.policy
    }

    /// Each backend's state now: cooldown, failures, counts.
    pub fn snapshot(&self) -> Vec<BackendSnapshot> {
        self.health().snapshot()
    }

    /// A read-only view of the backends' health, shared with this balance; the retry policy
    /// uses it to tell whether a retry can go anywhere.
    pub fn health(&self) -> BalanceHealth {
        BalanceHealth {
            shared: self.inner.shared.clone(),
        }
    }

    /// Picks the backend for a request: in the best tier that has one that takes the request
    /// (see [`BackendHealth::admit`]; for a request for a [`Deployment`], only those that offer
    /// it and do not cool down for it) and, when `tried` is given, was not tried yet, the next
    /// in the tier's rotation; else, in the best tier that has one that takes the request, the
    /// next after the last one tried (or the next in rotation if the last one tried is of
    /// another tier). Returns its index and whether the request is its trial.
    fn pick(
        &self,
        tried: Option<&TriedBackends>,
        deployment: Option<&Deployment>,
    ) -> Result<(usize, bool), BoxError> {
        let shared = &*self.inner.shared;
        if shared.backends.is_empty() {
            return Err(Box::new(NoBackends));
        }
        let backends = &*shared.backends;
        let now = LazyNow::new(&shared.clock);
        let refused = |i: usize| !backends[i].takes_deployment(deployment, || now.get());
        let picked = match tried {
            None => shared
                .tiers
                .iter()
                .find_map(|tier| tier.pick(backends, &now, deployment, refused)),
            Some(tried) => shared
                .tiers
                .iter()
                .find_map(|tier| {
                    tier.pick(backends, &now, deployment, |i| {
                        tried.contains(i) || refused(i)
                    })
                })
                .or_else(|| {
                    let last = tried.last()?;
                    shared
                        .tiers
                        .iter()
                        .find_map(|tier| tier.pick_after(backends, &now, deployment, last, refused))
                }),
        };
        if let Some(picked) = picked {
            return Ok(picked);
        }
        if let Some(deployment) = deployment
            && !backends.iter().any(|b| b.offers(deployment.as_str()))
        {
            return Err(Box::new(UnknownDeployment::new(deployment.clone())));
        }
        let soonest = shared
            .soonest_recovery(now.get(), deployment)
            .unwrap_or(TRIAL_RETRY_AFTER);
        Err(Box::new(AllCoolingDown::new(soonest)))
    }
}

/// A read-only view of a [`Balance`]'s backends' health (see [`Balance::health`]).
#[derive(Debug, Clone)]
pub struct BalanceHealth {
    shared: Arc<Shared>,
}

impl BalanceHealth {
    /// Takes over, for each backend that `previous` has too (by name), its state there:
    /// cooldowns (whole and per deployment), trial, counts and reasons. For a pool that
    /// replaces another (a configuration reload), so that a backend that stayed keeps what was
    /// learnt of it; a trial in flight in `previous` is owed again here.
    pub fn carry_over_from(&self, previous: &BalanceHealth) {
        for backend in self.shared.backends.iter() {
            if let Some(old) = previous
                .shared
                .backends
                .iter()
                .find(|old| old.name == backend.name)
            {
                backend.carry_over_from(old, &previous.shared.clock, &self.shared.clock);
            }
        }
    }

    /// How many backends there are.
    pub fn len(&self) -> usize {
        self.shared.backends.len()
    }

    /// Whether there are no backends at all.
    pub fn is_empty(&self) -> bool {
        self.shared.backends.is_empty()
    }

    /// Whether a backend that is not in `tried` and takes a request now exists: one available,
    /// or on trial with no trial in flight (cooling backends, and backends whose trial is in
    /// flight, do not take one). For a request for any deployment: per-deployment cooldowns
    /// and offered deployments are not looked at (see
    /// [`has_untried_available_for`](Self::has_untried_available_for)).
    pub fn has_untried_available(&self, tried: &TriedBackends) -> bool {
        self.has_untried_available_for(tried, None)
    }

    /// Whether a backend that is not in `tried` and offers `deployment` (any, when `None`)
    /// exists, whatever its health: one a request looking for its object may still ask
    /// ([`SeekObject`]).
    pub fn has_untried_for(&self, tried: &TriedBackends, deployment: Option<&Deployment>) -> bool {
        self.shared.first_untried(tried, deployment).is_some()
    }

    /// As [`has_untried_available`](Self::has_untried_available), for a request for
    /// `deployment` (the request's [`Deployment`] extension, if any): only backends that offer
    /// it and do not cool down for it count. The pick judges the same way.
    pub fn has_untried_available_for(
        &self,
        tried: &TriedBackends,
        deployment: Option<&Deployment>,
    ) -> bool {
        self.shared.has_untried_available(tried, deployment)
    }

    /// How long until a backend takes a request again; `None` when one does now (available, or
    /// on trial with no trial in flight). A backend whose trial is in flight counts as taking
    /// one again in [`TRIAL_RETRY_AFTER`]. For a request for any deployment (see
    /// [`soonest_recovery_for`](Self::soonest_recovery_for)).
    pub fn soonest_recovery(&self) -> Option<Duration> {
        self.shared.soonest_recovery(self.shared.clock.now(), None)
    }

    /// As [`soonest_recovery`](Self::soonest_recovery), for a request for `deployment` (the
    /// request's [`Deployment`] extension, if any): among the backends that offer it, each
    /// recovering at the later of its own recovery and the end of its cooldown for the
    /// deployment. `None` also when no backend offers it (the pick then fails with
    /// [`UnknownDeployment`], which no retry mends).
    pub fn soonest_recovery_for(&self, deployment: Option<&Deployment>) -> Option<Duration> {
        self.shared
            .soonest_recovery(self.shared.clock.now(), deployment)
    }

    /// Each backend's state now: cooldown, failures, counts.
    pub fn snapshot(&self) -> Vec<BackendSnapshot> {
        let now = self.shared.clock.now();
        self.shared
            .backends
            .iter()
            .enumerate()
            .map(|(index, backend)| backend.snapshot(index, now))
            .collect()
    }
}

impl Shared {
    /// See [`BalanceHealth::has_untried_available_for`].
    fn has_untried_available(
        &self,
        tried: &TriedBackends,
        deployment: Option<&Deployment>,
    ) -> bool {
        let now = self.clock.now();
        self.backends.iter().enumerate().any(|(index, backend)| {
            !tried.contains(index)
                && backend.takes_deployment(deployment, || now)
                && backend.is_available(|| now)
        })
    }

    /// The first backend not in `tried` that offers `deployment` (any, when `None`), whatever
    /// its health.
    fn first_untried(
        &self,
        tried: &TriedBackends,
        deployment: Option<&Deployment>,
    ) -> Option<usize> {
        (0..self.backends.len())
            .find(|&index| !tried.contains(index) && self.backends[index].serves(deployment))
    }

    /// How long after `now` the first backend that takes no request (for `deployment`, among
    /// those that offer it) takes one again; `None` when one takes a request at `now`.
    fn soonest_recovery(&self, now: u64, deployment: Option<&Deployment>) -> Option<Duration> {
        let soonest = self
            .backends
            .iter()
            .filter(|backend| backend.serves(deployment))
            .map(|backend| backend.recovery_for(deployment, now))
            .min()?;
        (!soonest.is_zero()).then_some(soonest)
    }
}

impl<S, C: Clone> Clone for Balance<S, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

impl<S, C: fmt::Debug> fmt::Debug for Balance<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let backends = &self.inner.shared.backends;
        let tiers: Vec<(u32, Vec<(&str, u32)>)> = self
            .inner
            .shared
            .tiers
            .iter()
            .map(|tier| {
                let members = tier
                    .members()
                    .iter()
                    .map(|&i| (&*backends[i].name, backends[i].weight))
                    .collect();
                (tier.priority, members)
            })
            .collect();
        f.debug_struct("Balance")
            .field("tiers", &tiers)
            .field("policy", &self.inner.shared.policy)
            .field("classifier", &self.classifier)
            .finish()
    }
}

impl<S, B, RB, C> Service<Request<B>> for Balance<S, C>
where
    S: Service<Request<B>, Response = http::Response<RB>> + Clone,
    S::Error: Into<BoxError>,
    C: Classify,
{
    type Response = http::Response<RB>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B, C>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Always ready: the backend is chosen per request in `call`, and the readiness of the
        // clone it drives is awaited by the response future (see the type's docs).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let shared = self.inner.shared.clone();
        let classifier = self.classifier.clone();
        // A reference count, not an allocation, and only for a request that names one.
        let deployment = request.extensions().get::<Deployment>().cloned();
        let tried = request.extensions().get::<TriedBackends>();
        let retry = tried.is_some_and(|tried| !tried.is_empty());
        let pinned = request.extensions().get::<PinnedTo>().and_then(|pin| {
            let found = shared
                .backends
                .iter()
                .position(|b| *b.name == *pin.as_str());
            found.map(|index| (index, false))
        });
        let seeking = || {
            let tried = tried?;
            if request.extensions().get::<SeekObject>().is_none()
                || shared.has_untried_available(tried, deployment.as_ref())
            {
                return None;
            }
            let found = shared.first_untried(tried, deployment.as_ref());
            found.map(|index| (index, false))
        };
        let chosen = pinned.or_else(seeking);
        match chosen.map_or_else(|| self.pick(tried, deployment.as_ref()), Ok) {
            Ok((index, trial)) => {
                let oneshot = self.inner.services[index].clone().oneshot(request);
                ResponseFuture::called(oneshot, index, trial, retry, deployment, shared, classifier)
            }
            Err(error) => ResponseFuture::refused(error, shared, classifier),
        }
    }
}

#[cfg(test)]
mod tests;
