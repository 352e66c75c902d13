//! Tower middleware that authenticates requests to Azure OpenAI with an Entra ID token or an api-key.
//!
//! # Example
//!
//! ```no_run
//! use aoai_auth::AzureAuthLayer;
//! use azure_core::http::{ClientOptions, RetryOptions};
//! use azure_identity::{ManagedIdentityCredential, ManagedIdentityCredentialOptions};
//! use http::{Request, Response};
//! use tower::{BoxError, Service, ServiceBuilder, ServiceExt, service_fn};
//!
//! # async fn run() -> Result<(), BoxError> {
//! // The token cache bounds and retries each fetch itself: no retries inside the credential.
//! let options = ManagedIdentityCredentialOptions {
//!     client_options: ClientOptions {
//!         retry: RetryOptions::none(),
//!         ..ClientOptions::default()
//!     },
//!     ..ManagedIdentityCredentialOptions::default()
//! };
//! let credential = ManagedIdentityCredential::new(Some(options))?;
//! let mut service = ServiceBuilder::new()
//!     .layer(AzureAuthLayer::from_credential(credential))
//!     .service(service_fn(|request: Request<String>| async move {
//!         // Send `request`, which now carries `Authorization: Bearer <token>`, to the instance.
//!         # let _ = request;
//!         Ok::<_, BoxError>(Response::new(String::new()))
//!     }));
//!
//! let request = Request::post("/openai/v1/chat/completions").body(String::new())?;
//! let response = service.ready().await?.call(request).await?;
//! # let _ = response;
//! # Ok(())
//! # }
//! ```
//!
//! [`AzureAuthLayer::from_api_key`] sets the `api-key` header instead. Either way the caller's own
//! `Authorization` and `api-key` headers are removed first: they are replaced, never forwarded.
//!
//! # Token cache
//!
//! The bearer header value is cached in a [`TokenCache`] that every clone of the service shares;
//! give several backends' layers clones of one cache ([`AzureAuthLayer::from_cache`]) and they
//! share one token. The token is fetched by a task spawned on the Tokio runtime (a Tokio runtime
//! is required), one attempt at a time, each attempt bounded by the fetch timeout
//! ([`DEFAULT_FETCH_TIMEOUT`], 5 s; [`AzureAuthLayer::with_fetch_timeout`]): a token endpoint
//! that refuses connections, answers an error, or accepts and never answers fails the attempt
//! within that time. Failed attempts are retried in the background after 1 s, doubling up to
//! 5 s, until one succeeds.
//!
//! How long a caller can wait, and what it gets:
//!
//! - **A valid token is cached: no wait.** The header is cloned out of the cache without
//!   allocating, and the token is refreshed in the background before it expires: 5 minutes
//!   before, or at half its lifetime for tokens that live less than 10 minutes. While the
//!   refresh fails (the token endpoint down), the valid token stays in use.
//! - **No valid token (first request, expired, or dropped after a 401): at most the token wait**
//!   ([`DEFAULT_TOKEN_WAIT`], 3 s; [`AzureAuthLayer::with_token_wait`]). The request waits for
//!   the running attempt, or starts one at once (at most one attempt start per second after a
//!   failure, so requests cut the backoff short without hammering the endpoint). It gets the
//!   token as soon as that attempt succeeds; [`error::TokenUnavailable`] as soon as it fails
//!   (with its reason); or [`error::TokenUnavailable`] when the token wait runs out (with the
//!   last failure's reason). The error's [`retry_after`](error::TokenUnavailable::retry_after)
//!   (at least 1 s) says when a new request gets a fresh attempt; a gateway answers it with
//!   `503 Service Unavailable` and that `Retry-After`. Once the token endpoint is back, the next
//!   request gets a token within about a second (or, if an attempt was hanging when the endpoint
//!   came back, once that attempt's fetch timeout ends it).
//!
//! The cache retries, so the credential should not: give it a short retry policy or none, for
//! example `ClientOptions { retry: RetryOptions::none(), .. }` in
//! `azure_identity::ManagedIdentityCredentialOptions`. With `azure_core`'s default policy (8
//! retries with backoff, over a minute against a refusing endpoint) each attempt runs until the
//! fetch timeout cuts it off, reporting the timeout instead of the endpoint's own failure.
//!
//! # 401 contract
//!
//! When the inner service answers `401 Unauthorized`, `AzureAuth` drops the token that request
//! carried from the cache, if it is still the cached one (compare-and-invalidate: any number of
//! concurrent 401s for the same token cause one new fetch). The 401 itself is returned unchanged;
//! `AzureAuth` does not retry. A retry layer above it (`aoai-retry`) retries the 401 once, and that
//! attempt waits for a fresh token. A credential that caches tokens itself may hand back the same
//! token; a second 401 is then the caller's answer. A 401 to an api-key, which no refresh can
//! mend, carries [`error::CredentialRejected`] in its extensions, for a balancer to take the
//! instance out of rotation at once.
//!
//! # Security
//!
//! - The caller's `Authorization` and `api-key` headers never reach the inner service.
//! - The header values this crate sets are marked sensitive
//!   ([`HeaderValue::set_sensitive`](http::HeaderValue::set_sensitive)), so `http`'s `Debug`
//!   prints them as `Sensitive`.
//! - The `Debug` output of [`AzureAuthLayer`], [`AzureAuth`], [`TokenCache`] and the errors
//!   never contains a token or a key, and neither does anything this crate logs.
//! - [`error::TokenUnavailable`] carries a summary of what failed (for example "the token endpoint
//!   answered HTTP 500"), not the credential's message, which may quote the token endpoint.
#![forbid(unsafe_code)]

mod cache;
pub mod error;
pub mod future;
mod layer;

use std::{
    fmt, mem,
    task::{Context, Poll},
};

use http::{
    HeaderName, HeaderValue, Request, Response,
    header::{AUTHORIZATION, HeaderMap},
};
use tower::{BoxError, Service};

pub use crate::{
    cache::{DEFAULT_FETCH_TIMEOUT, DEFAULT_SCOPE, DEFAULT_TOKEN_WAIT, TokenCache},
    future::ResponseFuture,
    layer::AzureAuthLayer,
};

/// The header Azure OpenAI reads an api-key from.
const API_KEY: HeaderName = HeaderName::from_static("api-key");

/// Sets `Authorization: Bearer <token>` (or `api-key`) on every request to the inner service,
/// after removing the caller's own `Authorization` and `api-key` headers.
///
/// Built by [`AzureAuthLayer`]; see the crate docs for the token cache and the 401 contract.
/// Fails with [`error::TokenUnavailable`] when no token can be obtained, and passes the inner
/// service's errors through as [`BoxError`].
///
/// # Readiness and `Clone`
///
/// [`poll_ready`](Service::poll_ready) is the inner service's. When a request has to wait for a
/// token, the future takes the inner service that was made ready and leaves a clone in its place,
/// hence the `S: Clone` bound; the clone is driven to readiness before the next call, as the
/// `Service` contract requires.
///
/// # Inner services that fail with `BoxError`
///
/// When the inner service's error is [`BoxError`] itself, awaiting this service's future inside
/// an async block that must be `Send` (`tokio::spawn`, an axum handler) may not compile:
/// "implementation of `From` is not general enough". That is a compiler limitation
/// ([rust-lang/rust#64552](https://github.com/rust-lang/rust/issues/64552)) shared by every
/// middleware with an `S::Error: Into<BoxError>` bound, tower's `Timeout` included. Box the
/// service ([`BoxCloneSyncService`](tower::util::BoxCloneSyncService)) before awaiting it there.
#[derive(Clone, Debug)]
pub struct AzureAuth<S> {
    inner: S,
    credentials: Credentials,
}

/// What `AzureAuth` authenticates with.
#[derive(Clone)]
enum Credentials {
    Bearer(TokenCache),
    ApiKey(HeaderValue),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bearer(cache) => f.debug_tuple("Bearer").field(cache).finish(),
            Self::ApiKey(_) => f.debug_tuple("ApiKey").field(&"<redacted>").finish(),
        }
    }
}

impl<S> AzureAuth<S> {
    fn new(inner: S, credentials: Credentials) -> Self {
        Self { inner, credentials }
    }

    /// Gets a reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Gets a mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

fn remove_caller_credentials(headers: &mut HeaderMap) {
    // One pass over the names settles the usual case, no credential, without hashing them.
    if headers
        .keys()
        .any(|name| name == AUTHORIZATION || name == API_KEY)
    {
        headers.remove(AUTHORIZATION);
        headers.remove(API_KEY);
    }
}

impl<S, B, RB> Service<Request<B>> for AzureAuth<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = Response<RB>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        remove_caller_credentials(request.headers_mut());
        match &self.credentials {
            Credentials::ApiKey(key) => {
                request.headers_mut().insert(API_KEY, key.clone());
                ResponseFuture::called(self.inner.call(request), None)
            }
            Credentials::Bearer(cache) => match cache.current() {
                Some(bearer) => {
                    request.headers_mut().insert(AUTHORIZATION, bearer.header);
                    let issued = Some((cache.clone(), bearer.generation));
                    ResponseFuture::called(self.inner.call(request), issued)
                }
                None => {
                    // The future calls the inner service once it has a token, so it takes the
                    // service `poll_ready` made ready and leaves a clone for the next request:
                    // https://docs.rs/tower/latest/tower/trait.Service.html#be-careful-when-cloning-inner-services
                    let clone = self.inner.clone();
                    let inner = mem::replace(&mut self.inner, clone);
                    ResponseFuture::waiting(cache.clone(), inner, request)
                }
            },
        }
    }
}
