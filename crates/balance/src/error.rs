//! Errors produced by [`Balance`](crate::Balance).

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use tower::BoxError;

use crate::{Deployment, ServedBy};

/// An error from one backend, naming the backend.
#[derive(Debug)]
pub struct BackendError {
    served_by: ServedBy,
    source: BoxError,
}

impl BackendError {
    pub(crate) fn new(served_by: ServedBy, source: BoxError) -> Self {
        Self { served_by, source }
    }

    /// The backend that failed.
    pub fn served_by(&self) -> &ServedBy {
        &self.served_by
    }

    /// The backend's own error.
    pub fn into_source(self) -> BoxError {
        self.source
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "backend {}: {}", self.served_by.name(), self.source)
    }
}

impl StdError for BackendError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.source)
    }
}

/// No backend takes a request: each is cooling down, or on trial with its trial in flight (for
/// a request carrying a [`Deployment`]: each backend that offers it is, or cools down for that
/// deployment). Answered at once, without contacting any backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllCoolingDown {
    retry_after: Duration,
}

impl AllCoolingDown {
    pub(crate) fn new(retry_after: Duration) -> Self {
        Self { retry_after }
    }

    /// How long until the first backend takes a request again: the soonest end of a cooldown,
    /// or [`TRIAL_RETRY_AFTER`](crate::TRIAL_RETRY_AFTER) if that is sooner and a backend's
    /// trial is in flight.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }
}

impl fmt::Display for AllCoolingDown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "every backend is cooling down; the first is available again in {} ms",
            self.retry_after.as_millis()
        )
    }
}

impl StdError for AllCoolingDown {}

/// No backend offers the deployment a request is for (see
/// [`BackendSpec::deployments`](crate::BackendSpec::deployments)): answered at once, without
/// contacting any backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownDeployment {
    deployment: Deployment,
}

impl UnknownDeployment {
    pub(crate) fn new(deployment: Deployment) -> Self {
        Self { deployment }
    }

    /// The deployment no backend offers.
    pub fn deployment(&self) -> &Deployment {
        &self.deployment
    }
}

impl fmt::Display for UnknownDeployment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no backend serves deployment `{}`", self.deployment)
    }
}

impl StdError for UnknownDeployment {}

/// `Balance` was built with an empty list of backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoBackends;

impl fmt::Display for NoBackends {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no backend is configured")
    }
}

impl StdError for NoBackends {}
