//! Per-caller token and request limits: [`TokenLimit`] holds each request's [`Caller`] to its
//! [`CallerLimits`](crate::CallerLimits) before any instance is contacted.
//!
//! A request over its caller's limit is not sent: its future fails at once with
//! [`LimitExceeded`], which says when it may go on (at the edge: Azure's 429 with `Retry-After`
//! and `retry-after-ms`). Tokens are charged when known, from the usage the answer carries: when
//! a JSON answer ends, or when a stream's usage chunk passes and the stream ends. Until then a
//! request is held to its estimated prompt ([`estimate_tokens`] of its body's length), so a burst
//! of large prompts cannot overshoot the minute by much. An answer without usage (an error, a
//! stream abandoned before its usage chunk, a chat stream not asked for
//! `stream_options.include_usage`) is charged its estimate.
//!
//! The caller comes from the [`Caller`] request extension, set by your own auth; a request
//! without one passes unlimited. The counts live in a [`TokenLimiter`], shared by its clones and
//! held in this process only; apps that admit requests their own way call
//! [`TokenLimiter::admit`] and [`Admission::settle`] directly.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//!
//! use aoai_usage::{Caller, CallerLimits, LimitExceeded, TokenLimitLayer, TokenLimiter};
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! let service = ServiceBuilder::new()
//!     .layer(TokenLimitLayer::new(TokenLimiter::new()))
//!     .service(service_fn(|_request: Request<String>| async {
//!         let json = r#"{"choices":[],"usage":{"prompt_tokens":700,"completion_tokens":200,"total_tokens":900}}"#;
//!         Ok::<_, Infallible>(
//!             Response::builder()
//!                 .header("content-type", "application/json")
//!                 .body(Full::new(Bytes::from_static(json.as_bytes())))
//!                 .unwrap(),
//!         )
//!     }));
//!
//! // What your auth would insert for the key it recognised.
//! let caller = Caller::new("search-team").with_limits(CallerLimits {
//!     tokens_per_minute: Some(1_000),
//!     requests_per_minute: None,
//! });
//! let request = |prompt: &str| {
//!     let mut request = Request::new(prompt.to_owned());
//!     request.extensions_mut().insert(caller.clone());
//!     request
//! };
//!
//! // Admitted; charged the 900 tokens it used once its body is read.
//! let response = service.clone().oneshot(request("a short prompt")).await?;
//! response.into_body().collect().await?;
//!
//! // 100 tokens left: a prompt of some 250 is refused, and not sent.
//! let error = service.oneshot(request(&"word ".repeat(200))).await.unwrap_err();
//! let exceeded = error.downcast_ref::<LimitExceeded>().unwrap();
//! assert_eq!(exceeded.caller(), "search-team");
//! assert_eq!(exceeded.retry_after().as_secs(), 9);
//! # Ok(())
//! # }
//! ```

use std::task::{Context, Poll};

use http::header::CONTENT_LENGTH;
use http::{Request, Response};
use http_body::Body;
use tower::{BoxError, Service};

use crate::{Caller, DEFAULT_PARSE_LIMIT, UsageBody};

pub mod error;
pub mod future;
mod layer;
mod limiter;

pub use error::{LimitExceeded, LimitKind};
pub use layer::TokenLimitLayer;
pub use limiter::{Admission, TokenLimiter};

use future::TokenLimitFuture;

/// A cheap estimate of a prompt's tokens from the length of its request body: a quarter of its
/// bytes, rounded up.
///
/// English text averages about four characters per token with OpenAI's tokenizers, and a request
/// body is that text inside JSON: the field names, quotes and settings around it make the
/// estimate a little higher than the prompt. Above is the safe side for a limit: the difference
/// is given back when the answer's usage is known.
///
/// ```
/// assert_eq!(aoai_usage::estimate_tokens(0), 0);
/// assert_eq!(aoai_usage::estimate_tokens(401), 101);
/// ```
pub const fn estimate_tokens(body_bytes: u64) -> u64 {
    body_bytes.div_ceil(4)
}

/// The estimate a request is admitted with: [`estimate_tokens`] of its `Content-Length`, or
/// else of its body's size hint (its lower bound: the exact size when the hint is exact). For
/// an admission made without [`TokenLimit`] (calling [`TokenLimiter::admit`] directly), so that
/// it estimates as the layer does.
pub fn estimate_request_tokens<B: Body>(request: &Request<B>) -> u64 {
    let body_length = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse().ok())
        .unwrap_or_else(|| request.body().size_hint().lower());
    estimate_tokens(body_length)
}

/// Holds each request's [`Caller`] to its tokens and requests per minute, counted in a
/// [`TokenLimiter`] (see the [module docs](self)).
///
/// A request is admitted against its estimated prompt: [`estimate_tokens`] of its
/// `Content-Length`, or else of its body's size hint (its lower bound: the exact size when the
/// hint is exact). An admitted request goes to the inner service, and its answer's body is a
/// [`UsageBody`] that reads the usage as it passes (as [`CountUsage`](crate::CountUsage) does)
/// and settles the request's [`Admission`] when the body ends, fails or is dropped. A request
/// over its limit is not sent: its future fails with [`LimitExceeded`]. A request without a
/// `Caller` extension passes unlimited, its body unread.
///
/// Readiness is the inner service's, as with tower's `Filter`: the limit is checked in `call`,
/// and a refused request leaves the readiness the inner service reserved for it unused (a
/// `Buffer` or a `ConcurrencyLimit` keeps its slot for the next request, or frees it when
/// dropped). `Clone` when `S` is; clones share the limiter.
#[derive(Clone, Debug)]
pub struct TokenLimit<S> {
    inner: S,
    limiter: TokenLimiter,
    parse_limit: usize,
}

impl<S> TokenLimit<S> {
    /// Wraps `inner`, counting in `limiter`.
    pub const fn new(inner: S, limiter: TokenLimiter) -> Self {
        Self {
            inner,
            limiter,
            parse_limit: DEFAULT_PARSE_LIMIT,
        }
    }

    /// A [`TokenLimitLayer`] counting in `limiter`.
    pub const fn layer(limiter: TokenLimiter) -> TokenLimitLayer {
        TokenLimitLayer::new(limiter)
    }

    /// Reads the usage of JSON answers (and single stream events) up to `bytes` long; see
    /// [`TokenLimitLayer::parse_up_to`].
    pub const fn parse_up_to(mut self, bytes: usize) -> Self {
        self.parse_limit = bytes;
        self
    }

    /// The limiter it counts in.
    pub fn limiter(&self) -> &TokenLimiter {
        &self.limiter
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for TokenLimit<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    ReqBody: Body,
    ResBody: Body,
{
    type Response = Response<UsageBody<ResBody, Admission>>;
    type Error = BoxError;
    type Future = TokenLimitFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let admission = match request.extensions().get::<Caller>() {
            None => Admission::unlimited(),
            Some(caller) => {
                let estimate = estimate_request_tokens(&request);
                match self.limiter.admit(caller, estimate) {
                    Ok(admission) => admission,
                    // Not calling the inner service, as tower's `Filter` does not.
                    Err(exceeded) => return TokenLimitFuture::refused(exceeded),
                }
            }
        };
        TokenLimitFuture::called(self.inner.call(request), admission, self.parse_limit)
    }
}
