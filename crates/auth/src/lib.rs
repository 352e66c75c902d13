//! Tower middleware that authenticates requests to Azure OpenAI with an Entra ID token or an api-key.
//!
//! # Example
//!
//! ```no_run
//! use aoai_auth::AzureAuthLayer;
//! use azure_identity::ManagedIdentityCredential;
//! use http::{Request, Response};
//! use tower::{BoxError, Service, ServiceBuilder, ServiceExt, service_fn};
//!
//! # async fn run() -> Result<(), BoxError> {
//! let credential = ManagedIdentityCredential::new(None)?;
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
//! share one token. A request waits for the credential only when no valid token is cached, and
//! concurrent requests then share a single fetch. Otherwise the header is cloned out of the cache
//! without allocating, and the token is refreshed in the background before it expires: 5 minutes
//! before, or at half its lifetime for tokens that live less than 10 minutes. A failed background
//! refresh keeps the valid token in use and retries with backoff (1 s doubling to 30 s). When no
//! valid token can be had, the service fails with [`error::TokenUnavailable`], which a gateway
//! answers with `503 Service Unavailable`.
//!
//! The background refresh is spawned on the Tokio runtime that runs the request.
//!
//! # 401 contract
//!
//! When the inner service answers `401 Unauthorized`, `AzureAuth` drops the token that request
//! carried from the cache, if it is still the cached one (compare-and-invalidate: any number of
//! concurrent 401s for the same token cause one new fetch). The 401 itself is returned unchanged;
//! `AzureAuth` does not retry. A retry layer above it (`aoai-retry`) retries the 401 once, and that
//! attempt waits for a fresh token. A credential that caches tokens itself may hand back the same
//! token; a second 401 is then the caller's answer.
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
