//! Retry a failed Azure OpenAI request on the next backend, honouring `Retry-After`.
//!
//! [`RetryNextBackendLayer`] goes in front of an [`aoai_balance::Balance`] (or any balancer that
//! says which backends are available: [`BackendAvailability`]). It reads the request body once
//! into [`Bytes`](bytes::Bytes) (over the limit: [`BodyTooLarge`], and no backend is contacted;
//! the rest of the body is read and dropped in the background, see
//! [`RetryNextBackendLayer::linger`]), then makes the attempts, asking the [`RetryNextBackend`]
//! policy after each one whether to retry: the body is replayed on each attempt, and each retry
//! goes to a backend not tried yet. The policy is a tower [`Policy`](tower::retry::Policy), and
//! can drive tower's [`Retry`](tower::retry::Retry) too.
//!
//! # Example
//!
//! ```
//! use aoai_balance::{Balance, ServedBy};
//! use aoai_retry::{ReplayBody, RetryNextBackendLayer};
//! use http::{Request, Response, StatusCode};
//! use std::convert::Infallible;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! let backend = |status: StatusCode| {
//!     service_fn(move |_req: Request<ReplayBody>| async move {
//!         let mut response = Response::new(String::new());
//!         *response.status_mut() = status;
//!         Ok::<_, Infallible>(response)
//!     })
//! };
//! let balance = Balance::new([
//!     ("east", backend(StatusCode::SERVICE_UNAVAILABLE)),
//!     ("west", backend(StatusCode::OK)),
//! ]);
//! let service = ServiceBuilder::new()
//!     .layer(RetryNextBackendLayer::new(balance.health()).max_attempts(3))
//!     .service(balance);
//!
//! let response = service.oneshot(Request::new(String::from("{}"))).await?;
//! assert_eq!(response.status(), StatusCode::OK);
//! assert_eq!(response.extensions().get::<ServedBy>().unwrap().name(), "west");
//! # Ok(())
//! # }
//! ```
//!
//! # What is retried, and where
//!
//! See [`RetryNextBackend`]. The classification is the same [`Classify`] the `Balance` uses for
//! its cooldowns; pass your own with [`RetryNextBackendLayer::classifier`] (and give `Balance`
//! the same one).
//!
//! # Timeouts
//!
//! Put a [`tower::timeout::TimeoutLayer`] on each backend for the per-attempt timeout to the
//! response headers (the classifier treats its `Elapsed` as a retryable failure), and set an
//! overall deadline with [`RetryNextBackendLayer::deadline`] (or a `TimeoutLayer` in front of
//! this layer, which arms a timer for every request).

#![forbid(unsafe_code)]

mod availability;
mod body;
mod deadline;
pub mod error;
pub mod future;
mod linger;
mod policy;

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use aoai_balance::{AzureOpenAiClassifier, Classify};
use http::{Request, Response};
use http_body::Body;
use tower::retry::budget::TpsBudget;
use tower::{BoxError, Layer, Service};

pub use crate::availability::{AlwaysAvailable, BackendAvailability};
pub use crate::body::ReplayBody;
pub use crate::error::{BodyReadError, BodyTooLarge, DeadlineElapsed};
pub use crate::future::ResponseFuture;
pub use crate::policy::{Backoff, RetryNextBackend, set_retry_after};

use crate::deadline::DeadlineSettings;
use crate::linger::Linger;
use crate::policy::RetrySettings;

/// The default body limit: 16 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 16 * 1024 * 1024;

/// The default number of attempts (the first one included): 3.
pub const DEFAULT_MAX_ATTEMPTS: usize = 3;

/// Layer that adds [`RetryNextBackendService`]: read the body once, retry on the next backend.
///
/// Built from the [`BalanceHealth`](aoai_balance::BalanceHealth) of the
/// [`Balance`](aoai_balance::Balance) it wraps (or the [`BackendAvailability`] of another
/// balancer), so it knows whether a retry can go anywhere.
#[derive(Debug, Clone)]
pub struct RetryNextBackendLayer<C = AzureOpenAiClassifier> {
    health: Arc<dyn BackendAvailability>,
    classifier: C,
    max_attempts: usize,
    body_limit: usize,
    backoff_base: Duration,
    backoff_max: Duration,
    budget: Option<(Duration, u32, f32)>,
    deadline: Option<DeadlineSettings>,
    linger: Linger,
}

impl RetryNextBackendLayer {
    /// Defaults: 3 attempts, a 16 MiB body limit, backoff 100 ms doubling to 2 s, tower's
    /// default retry budget (retries may add 20% to the traffic, at least 10 a second, over a
    /// 10 s window), and lingering on an over-limit body for 30 s in all, 5 s between frames,
    /// up to 64 MiB.
    ///
    /// `health` is what the balancer behind says of its backends: `balance.health()` for a
    /// [`Balance`](aoai_balance::Balance), [`AlwaysAvailable`] for a balancer that knows no
    /// health.
    pub fn new(health: impl BackendAvailability) -> Self {
        Self {
            health: Arc::new(health),
            classifier: AzureOpenAiClassifier,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            body_limit: DEFAULT_BODY_LIMIT,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            budget: Some((Duration::from_secs(10), 10, 0.2)),
            deadline: None,
            linger: Linger::DEFAULT,
        }
    }
}

impl<C> RetryNextBackendLayer<C> {
    /// Sets the number of attempts, the first one included (at least 1).
    pub fn max_attempts(mut self, attempts: usize) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Sets the largest request body, in bytes, that is read and replayed.
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// Sets the backoff before a retry to an already-tried backend: a random wait up to `base`
    /// doubled per attempt, capped at `max`.
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.backoff_base = base;
        self.backoff_max = max;
        self
    }

    /// Sets the retry budget, tower's [`TpsBudget`]: retries may add `retry_percent` of the
    /// requests seen over `ttl`, and at least `min_per_sec` a second. Values outside what
    /// [`TpsBudget::new`] accepts are brought within it: `ttl` to 1 to 60 s, `retry_percent` to
    /// 0 to 1000.
    pub fn budget(mut self, ttl: Duration, min_per_sec: u32, retry_percent: f32) -> Self {
        self.budget = Some((ttl, min_per_sec, retry_percent));
        self
    }

    /// Turns the retry budget off.
    pub fn without_budget(mut self) -> Self {
        self.budget = None;
        self
    }

    /// Sets a deadline for each whole request: reading its body, every attempt and every
    /// backoff, until a backend's response head. When it passes, the request fails with
    /// [`DeadlineElapsed`] (whatever attempt was under way is dropped). No deadline by default.
    ///
    /// `attempt_timeout` is the timeout each backend applies to one attempt (a
    /// [`TimeoutLayer`](tower::timeout::TimeoutLayer) below the `Balance`), if there is one.
    /// Knowing it, the deadline arms a timer only when something could outlast it (a body still
    /// arriving, a backoff, an attempt starting too late for its own timeout to end first), not
    /// for every request; without it, every request arms one.
    pub fn deadline(mut self, deadline: Duration, attempt_timeout: Option<Duration>) -> Self {
        self.deadline = Some(DeadlineSettings {
            limit: deadline,
            attempt_timeout,
        });
        self
    }

    /// Sets how the rest of a body over the limit is read and dropped, as nginx's lingering
    /// close: for at most `total` in all, at most `idle` between two frames, and `max_bytes`
    /// (beyond which the body is dropped). The caller's [`BodyTooLarge`] is answered at once;
    /// this goes on in a task of its own (when a tokio runtime is current; otherwise the body
    /// is dropped at once), so that a caller that writes its whole body before it reads, as
    /// many HTTP/1.1 clients do, reads the 413 rather than a connection reset (which it gets if
    /// the body is dropped while it still sends). A zero `total` turns lingering off: the body
    /// is dropped at once.
    /// Default: 30 s, 5 s and 64 MiB (nginx's `lingering_time` and `lingering_timeout`).
    pub fn linger(mut self, total: Duration, idle: Duration, max_bytes: u64) -> Self {
        self.linger = Linger {
            total,
            idle,
            max_bytes,
        };
        self
    }

    /// Replaces the classifier (give the `Balance` the same one).
    pub fn classifier<C2>(self, classifier: C2) -> RetryNextBackendLayer<C2> {
        RetryNextBackendLayer {
            health: self.health,
            classifier,
            max_attempts: self.max_attempts,
            body_limit: self.body_limit,
            backoff_base: self.backoff_base,
            backoff_max: self.backoff_max,
            budget: self.budget,
            deadline: self.deadline,
            linger: self.linger,
        }
    }
}

impl<S, C: Clone> Layer<S> for RetryNextBackendLayer<C> {
    type Service = RetryNextBackendService<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        let settings = Arc::new(RetrySettings {
            health: self.health.clone(),
            max_attempts: self.max_attempts,
            backoff_base: self.backoff_base,
            backoff_max: self.backoff_max,
            budget: self.budget.map(|(ttl, min_per_sec, percent)| {
                TpsBudget::new(
                    ttl.clamp(Duration::from_secs(1), Duration::from_secs(60)),
                    min_per_sec.min(i32::MAX as u32 - 1),
                    if percent.is_nan() {
                        0.0
                    } else {
                        percent.clamp(0.0, 1000.0)
                    },
                )
            }),
        });
        let policy = RetryNextBackend::new(self.classifier.clone(), settings);
        RetryNextBackendService {
            service: inner,
            policy,
            body_limit: self.body_limit,
            deadline: self.deadline,
            linger: self.linger,
        }
    }
}

/// Reads the request body once (up to a limit) and retries on the next backend.
/// See [`RetryNextBackendLayer`].
///
/// # Clone and readiness
///
/// Reading the body is asynchronous, so `call` takes the inner service that `poll_ready` made
/// ready and leaves a clone in its place (see "Be careful when cloning inner services" in the
/// [`tower::Service`] docs). The inner service (a `Balance`) must be `Clone`.
///
/// # The request body
///
/// The body must be `Send + Unpin + 'static`, as hyper's `Incoming` and axum's `Body` are: the
/// rest of a body over the limit is moved into a task of its own and read there (see
/// [`RetryNextBackendLayer::linger`]). Pin a body that is not `Unpin` in a `Box`
/// (`Pin<Box<B>>` is a body too).
#[derive(Debug, Clone)]
pub struct RetryNextBackendService<S, C = AzureOpenAiClassifier> {
    service: S,
    policy: RetryNextBackend<C>,
    body_limit: usize,
    deadline: Option<DeadlineSettings>,
    linger: Linger,
}

impl<S, C> RetryNextBackendService<S, C> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.service
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.service
    }

    /// Unwraps the service.
    pub fn into_inner(self) -> S {
        self.service
    }
}

impl<S, B, RB, C> Service<Request<B>> for RetryNextBackendService<S, C>
where
    S: Service<Request<ReplayBody>, Response = Response<RB>, Error = BoxError> + Clone,
    B: Body + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
    C: Classify,
{
    type Response = Response<RB>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.service.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let declared = request
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.body_limit as u64) {
            self.linger.spawn(request.into_body());
            let error = Box::new(BodyTooLarge::new(self.body_limit));
            return ResponseFuture::refused(error, self.service.clone(), self.policy.clone());
        }
        self.policy.deposit();
        // Take the service `poll_ready` readied; leave a clone (see the type's docs).
        let clone = self.service.clone();
        let ready = std::mem::replace(&mut self.service, clone);
        ResponseFuture::reading(
            request,
            ready,
            self.policy.clone(),
            self.body_limit,
            self.deadline,
            self.linger,
        )
    }
}

#[cfg(test)]
mod tests;
