//! [`RetryNextBackend`]: the retry policy.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use aoai_balance::{
    AllCoolingDown, AzureOpenAiClassifier, BackendError, Classify, Deployment, NoBackends, Outcome,
    ServedBy, TriedBackends, UnknownDeployment,
};
use http::{Extensions, HeaderName, HeaderValue, Method, Request, Response, Uri, Version};
use pin_project_lite::pin_project;
use tower::BoxError;
use tower::retry::Policy;
use tower::retry::budget::{Budget, TpsBudget};

use crate::{BackendAvailability, ReplayBody};

/// Retries a failed Azure OpenAI request on the next backend of a
/// [`Balance`](aoai_balance::Balance).
///
/// - Retried: what the [`Classify`]er calls retryable: connect errors, attempt timeouts, 408,
///   429, 500, 502, 503, 504, and a 401 once (after [`AzureAuth`]'s token refresh). Never: other
///   4xx, and nothing once the response has been handed on.
/// - Where: each attempt records its backend in the request's [`TriedBackends`], so `Balance`
///   sends the retry to a backend not tried yet, never the one that just failed while another
///   is available. A retry to an untried backend goes at once; one to an already-tried backend
///   waits a jittered exponential backoff.
/// - When not: after `max_attempts` attempts, when the retry budget is spent, or when every
///   backend cools down. A 429 that meets every backend cooling down goes back to the caller
///   with `Retry-After` and `retry-after-ms` set to the soonest recovery.
///
/// Per-request state (the attempt count) lives in the clone made for each request (by
/// [`RetryNextBackendService`](crate::RetryNextBackendService), or by tower's
/// [`Retry`](tower::retry::Retry) when it drives the policy), so one policy serves every
/// request.
///
/// [`AzureAuth`]: https://docs.rs/aoai-auth
#[derive(Debug, Clone)]
pub struct RetryNextBackend<C = AzureOpenAiClassifier> {
    classifier: C,
    // What every clone shares, the backends' availability included, behind one reference count.
    settings: Arc<RetrySettings>,
    attempts: usize,
    unauthorized_retried: bool,
}

/// What every clone of the policy shares.
#[derive(Debug)]
pub(crate) struct RetrySettings {
    pub(crate) health: Arc<dyn BackendAvailability>,
    pub(crate) max_attempts: usize,
    pub(crate) backoff_base: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) budget: Option<TpsBudget>,
}

impl<C> RetryNextBackend<C> {
    pub(crate) fn new(classifier: C, settings: Arc<RetrySettings>) -> Self {
        Self {
            classifier,
            settings,
            attempts: 0,
            unauthorized_retried: false,
        }
    }

    /// Counts a request in the retry budget, if there is one.
    pub(crate) fn deposit(&self) {
        if let Some(budget) = &self.settings.budget {
            budget.deposit();
        }
    }

    /// The outcome of an attempt, if it is one a retry could mend; `None` for a success, a final
    /// answer, and the errors no other backend can help with (every backend cooling down, none
    /// configured).
    pub(crate) fn retryable_outcome<RB>(
        &self,
        result: &Result<Response<RB>, BoxError>,
    ) -> Option<Outcome>
    where
        C: Classify,
    {
        let outcome = match result {
            Ok(response) => self.classifier.classify_answer(response),
            Err(error)
                if error.is::<AllCoolingDown>()
                    || error.is::<NoBackends>()
                    || error.is::<UnknownDeployment>() =>
            {
                return None;
            }
            Err(error) => self.classifier.classify_error(&**error),
        };
        outcome.is_retryable_elsewhere().then_some(outcome)
    }

    /// Whether to retry after an attempt whose outcome a retry could mend (from
    /// [`RetryNextBackend::retryable_outcome`]), and after what wait; records the attempt's
    /// backend in the request's [`TriedBackends`].
    pub(crate) fn decide_retry<RB>(
        &mut self,
        outcome: Outcome,
        request: &mut Request<ReplayBody>,
        result: &mut Result<Response<RB>, BoxError>,
    ) -> Option<Backoff> {
        let served_by = match result {
            Ok(response) => response.extensions().get::<ServedBy>().cloned(),
            Err(error) => error
                .downcast_ref::<BackendError>()
                .map(|e| e.served_by().clone()),
        };
        let backend = served_by.as_ref().map_or("", ServedBy::name);
        // The deployment the request is for, as the request says or, when a layer below the
        // retry named it (from the path or the body), as the answer carries it back; kept on
        // the request for the attempts after this one.
        let deployment = request
            .extensions()
            .get::<Deployment>()
            .cloned()
            .or_else(|| {
                let found = result
                    .as_ref()
                    .ok()
                    .and_then(|response| response.extensions().get::<Deployment>().cloned())?;
                request.extensions_mut().insert(found.clone());
                Some(found)
            });
        let deployment = deployment.as_ref();
        let tried = request
            .extensions_mut()
            .get_or_insert_default::<TriedBackends>();
        if let Some(served_by) = &served_by {
            tried.insert(served_by.index());
        }
        if matches!(outcome, Outcome::NotHere) {
            // Asking where an object lives: the backends not asked yet, one after another, at
            // once. Not an attempt of the request's own (no backoff, not counted against the
            // attempts or the retry budget): it was answered, just not here.
            let untried = self.settings.health.has_untried(tried, deployment);
            if untried {
                tracing::debug!(backend, "not here; asking the next backend");
            }
            return untried.then(|| Backoff::new(None));
        }
        self.attempts += 1;
        if let Some(recovery) = self.settings.health.soonest_recovery(deployment) {
            if let Ok(response) = result
                && matches!(outcome, Outcome::Throttled { .. })
            {
                set_retry_after(response, recovery);
            }
            tracing::warn!(
                backend,
                attempt = self.attempts,
                reason = outcome.reason(),
                recovery_ms = millis(recovery),
                "every backend is cooling down; not retrying"
            );
            return None;
        }
        if matches!(
            outcome,
            Outcome::CredentialUnavailable { .. } | Outcome::Forbidden
        ) && !self
            .settings
            .health
            .has_untried_available(tried, deployment)
        {
            // Only a backend that authenticates another way (or holds another role assignment)
            // could help, and only one not tried yet: no backoff, no second go at the same one.
            return None;
        }
        if matches!(outcome, Outcome::Unauthorized) {
            if self.unauthorized_retried {
                return None;
            }
            self.unauthorized_retried = true;
        }
        if self.attempts >= self.settings.max_attempts {
            return None;
        }
        if let Some(budget) = &self.settings.budget
            && !budget.withdraw()
        {
            tracing::warn!(
                backend,
                attempt = self.attempts,
                "retry budget spent; not retrying"
            );
            return None;
        }
        let delay = (!self
            .settings
            .health
            .has_untried_available(tried, deployment))
        .then(|| self.backoff());
        tracing::info!(
            backend,
            attempt = self.attempts,
            reason = outcome.reason(),
            delay_ms = delay.map_or(0, millis),
            "retrying on the next backend"
        );
        Some(Backoff::new(delay))
    }

    /// A full-jitter exponential backoff for a retry after `attempts` attempts.
    fn backoff(&self) -> Duration {
        let exponent = u32::try_from(self.attempts.saturating_sub(1)).unwrap_or(u32::MAX);
        let ceiling = self
            .settings
            .backoff_base
            .saturating_mul(2u32.saturating_pow(exponent.min(16)))
            .min(self.settings.backoff_max);
        ceiling.mul_f64(rand::random::<f64>())
    }
}

impl<C, RB> Policy<Request<ReplayBody>, Response<RB>, BoxError> for RetryNextBackend<C>
where
    C: Classify,
{
    type Future = Backoff;

    fn retry(
        &mut self,
        request: &mut Request<ReplayBody>,
        result: &mut Result<Response<RB>, BoxError>,
    ) -> Option<Backoff> {
        // The common case, a success or a final answer, ends here, without touching the
        // request's extensions.
        let outcome = self.retryable_outcome(result)?;
        self.decide_retry(outcome, request, result)
    }

    fn clone_request(&mut self, request: &Request<ReplayBody>) -> Option<Request<ReplayBody>> {
        Some(copy_request(request))
    }
}

/// What a retry needs of a request, kept while an attempt is under way; a retry, which is rare,
/// rebuilds the request from it ([`RequestCopy::to_request`]).
///
/// The header fields are copied into one buffer, as their bytes. A `HeaderMap` clone would cost
/// two allocations and, for each field value, a reference count taken now and given back at the
/// end: an atomic instruction each time, about as costly as a hundred plain ones, for a copy
/// that is almost never used.
#[derive(Debug)]
pub(crate) struct RequestCopy {
    method: Method,
    uri: Uri,
    version: Version,
    /// For each field: whether its value is sensitive (one byte), the name's length and the
    /// value's (four bytes each, little-endian), the name, the value.
    fields: Vec<u8>,
    field_count: usize,
    extensions: Extensions,
    body: ReplayBody,
}

impl RequestCopy {
    pub(crate) fn of(request: &Request<ReplayBody>) -> Self {
        let headers = request.headers();
        // Room for the usual fields: one allocation, grown only for long ones.
        let mut fields = Vec::with_capacity(headers.len() * 64);
        for (name, value) in headers {
            let (name, value_bytes) = (name.as_str().as_bytes(), value.as_bytes());
            let mut lengths = [0; 9];
            lengths[0] = u8::from(value.is_sensitive());
            lengths[1..5].copy_from_slice(&field_length(name.len()));
            lengths[5..].copy_from_slice(&field_length(value_bytes.len()));
            fields.extend_from_slice(&lengths);
            fields.extend_from_slice(name);
            fields.extend_from_slice(value_bytes);
        }
        Self {
            method: request.method().clone(),
            uri: request.uri().clone(),
            version: request.version(),
            fields,
            field_count: headers.len(),
            extensions: request.extensions().clone(),
            body: request.body().clone(),
        }
    }

    /// The request again, its fields in the order they came, with room for one more field (the
    /// credential `AzureAuth` adds).
    pub(crate) fn to_request(&self) -> Request<ReplayBody> {
        let mut request = Request::new(self.body.clone());
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        *request.extensions_mut() = self.extensions.clone();
        let headers = request.headers_mut();
        headers.reserve(self.field_count + 1);
        let mut rest = &self.fields[..];
        while let Some((&sensitive, after)) = rest.split_first() {
            let (name_length, after) = after.split_at(4);
            let (value_length, after) = after.split_at(4);
            let (name, after) = after.split_at(read_length(name_length));
            let (value, after) = after.split_at(read_length(value_length));
            rest = after;
            // Both were a valid name and a valid value when copied.
            if let (Ok(name), Ok(mut value)) =
                (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
            {
                value.set_sensitive(sensitive == 1);
                headers.append(name, value);
            }
        }
        request
    }
}

fn field_length(length: usize) -> [u8; 4] {
    // A header map holds far less than 4 GiB.
    u32::try_from(length).unwrap_or(u32::MAX).to_le_bytes()
}

fn read_length(bytes: &[u8]) -> usize {
    let mut length = [0; 4];
    length.copy_from_slice(bytes);
    u32::from_le_bytes(length) as usize
}

/// A copy of a request for one attempt: its body's bytes are shared, not copied.
pub(crate) fn copy_request(request: &Request<ReplayBody>) -> Request<ReplayBody> {
    let mut copy = Request::new(request.body().clone());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    *copy.extensions_mut() = request.extensions().clone();
    copy
}

/// Sets `Retry-After` (whole seconds, rounded up) and `retry-after-ms` on a response, and
/// removes `x-ratelimit-reset-requests` and `x-ratelimit-reset-tokens`: on a 429 passed on from
/// one instance with the soonest recovery of all, those would tell the caller that instance's
/// own window, which disagrees with the wait it is given.
pub fn set_retry_after<B>(response: &mut Response<B>, wait: Duration) {
    let millis = millis(wait);
    let headers = response.headers_mut();
    headers.remove("x-ratelimit-reset-requests");
    headers.remove("x-ratelimit-reset-tokens");
    headers.insert("retry-after", HeaderValue::from(millis.div_ceil(1000)));
    headers.insert("retry-after-ms", HeaderValue::from(millis));
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

pin_project! {
    /// The wait before a retry: none for an untried backend, a jittered backoff otherwise.
    #[derive(Debug)]
    pub struct Backoff {
        #[pin]
        sleep: Option<tokio::time::Sleep>,
    }
}

impl Backoff {
    fn new(delay: Option<Duration>) -> Self {
        Self {
            sleep: delay.map(tokio::time::sleep),
        }
    }
}

impl Future for Backoff {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.project().sleep.as_pin_mut() {
            Some(sleep) => sleep.poll(cx),
            None => Poll::Ready(()),
        }
    }
}
