//! [`BackendAvailability`]: what the retry policy asks of the balancer it wraps.

use std::fmt;
use std::time::Duration;

use aoai_balance::{BalanceHealth, Deployment, TriedBackends};

/// What the retry policy needs to know of the balancer behind it: whether a retry can go to a
/// backend not tried yet (then it goes at once; otherwise it waits a backoff first), and whether
/// every backend is cooling down (then it is not made at all).
///
/// Implemented by [`BalanceHealth`] (from [`Balance::health`](aoai_balance::Balance::health))
/// and by [`AlwaysAvailable`], for a balancer that knows no health; implement it to put
/// [`RetryNextBackendLayer`](crate::RetryNextBackendLayer) in front of a balancer of your own.
pub trait BackendAvailability: fmt::Debug + Send + Sync + 'static {
    /// Whether a backend that is neither cooling down (for `deployment`, when the request
    /// names one) nor in `tried` exists.
    fn has_untried_available(&self, tried: &TriedBackends, deployment: Option<&Deployment>)
    -> bool;

    /// Whether a backend not in `tried` that offers `deployment` exists, whatever its health:
    /// one a request looking for its object may still ask (an
    /// [`Outcome::NotHere`](aoai_balance::Outcome::NotHere) answer). Default: the same as
    /// [`has_untried_available`](Self::has_untried_available).
    fn has_untried(&self, tried: &TriedBackends, deployment: Option<&Deployment>) -> bool {
        self.has_untried_available(tried, deployment)
    }

    /// How long until a backend takes traffic for `deployment` (any, when `None`) again;
    /// `None` when one does now.
    fn soonest_recovery(&self, deployment: Option<&Deployment>) -> Option<Duration>;
}

impl BackendAvailability for BalanceHealth {
    fn has_untried_available(
        &self,
        tried: &TriedBackends,
        deployment: Option<&Deployment>,
    ) -> bool {
        self.has_untried_available_for(tried, deployment)
    }

    fn has_untried(&self, tried: &TriedBackends, deployment: Option<&Deployment>) -> bool {
        self.has_untried_for(tried, deployment)
    }

    fn soonest_recovery(&self, deployment: Option<&Deployment>) -> Option<Duration> {
        self.soonest_recovery_for(deployment)
    }
}

/// The [`BackendAvailability`] of a balancer that knows no health: a backend is always
/// available, so a retry is never given up because every backend cools down; and no backend is
/// known to be untried, so every retry waits the backoff first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AlwaysAvailable;

impl BackendAvailability for AlwaysAvailable {
    fn has_untried_available(&self, _: &TriedBackends, _: Option<&Deployment>) -> bool {
        false
    }

    fn soonest_recovery(&self, _: Option<&Deployment>) -> Option<Duration> {
        None
    }
}
