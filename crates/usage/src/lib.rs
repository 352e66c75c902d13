//! Tower middleware that reads the token usage of every Azure OpenAI answer as it passes: JSON
//! answers and server-sent event streams, without holding back a byte of what it forwards.
//!
//! [`CountUsage`] wraps each response body in a [`UsageBody`] that hands every frame on the moment
//! the inner body yields it, and reads the usage on the way:
//!
//! - `application/json` answers (Chat Completions, Completions, Embeddings, the Responses API) are
//!   copied up to a bound ([`DEFAULT_PARSE_LIMIT`], set with [`UsageLayer::parse_up_to`]) and
//!   their `usage` parsed at the end; longer answers are not parsed.
//! - `text/event-stream` answers are split into events as chunks arrive (an event may span
//!   chunks; only the incomplete tail is kept), and each event whose data holds a `"usage"`
//!   object (not `null`) is parsed: the last chunk of a chat stream asked for with `stream_options.include_usage`, the
//!   Responses API's `response.completed` event. `[DONE]` is skipped.
//! - Anything else, and encoded bodies (`Content-Encoding: gzip`, ...), pass unread.
//!
//! Each request gets a callback, made from the request by a [`MakeUsageCallback`] (any
//! `FnMut(&Request<B>) -> impl FnOnce(UsageReport)`, or a [`UsageCallback`] of your own that
//! also sees the answer's head), so it can capture whatever identifies the caller or the
//! deployment. It is called exactly once with a [`UsageReport`]: when the body ends,
//! or when it fails or is dropped before its end (the caller abandoned the stream:
//! `complete: false`, with the usage seen so far), or when the inner service fails or the response
//! future is dropped (`usage: None, complete: false`). The body never fails because of what it
//! reads: unreadable usage is `None`.
//!
//! [`TokenLimit`] reads usage the same way to hold each [`Caller`] to its tokens and requests per
//! minute, refusing a request over its limit before any instance is contacted (see [`limit`]).
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use std::sync::{Arc, Mutex};
//!
//! use aoai_usage::{Usage, UsageLayer, UsageReport};
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let reports = Arc::new(Mutex::new(Vec::new()));
//! let sink = reports.clone();
//! let service = ServiceBuilder::new()
//!     // Per request: a callback that records the report (a real one would also capture the
//!     // caller's name from `request`, and charge its token limit).
//!     .layer(UsageLayer::new(move |_request: &Request<String>| {
//!         let sink = sink.clone();
//!         move |report: UsageReport| sink.lock().unwrap().push(report)
//!     }))
//!     .service(service_fn(|_request: Request<String>| async {
//!         let json = r#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17}}"#;
//!         Ok::<_, Infallible>(
//!             Response::builder()
//!                 .header("content-type", "application/json")
//!                 .body(Full::new(Bytes::from_static(json.as_bytes())))
//!                 .unwrap(),
//!         )
//!     }));
//!
//! let response = service.oneshot(Request::new(String::new())).await?;
//! let body = response.into_body().collect().await?.to_bytes();
//! assert!(body.starts_with(b"{\"choices\""));
//!
//! let reports = reports.lock().unwrap();
//! assert_eq!(reports.len(), 1);
//! assert!(reports[0].complete);
//! assert_eq!(
//!     reports[0].usage,
//!     Some(Usage { input_tokens: 12, output_tokens: 5, total_tokens: 17, ..Usage::default() })
//! );
//! # Ok(())
//! # }
//! ```
//!
//! # Design
//!
//! The callback is a plain closure made per request rather than a shared `Arc<dyn Fn>`: it is
//! generic (no boxing, no dynamic call), it carries per-request facts without a lookup, and
//! `FnOnce` makes "exactly once" a property of the type.
//!
//! Streams of chat completions report usage only when the request asks for it
//! (`stream_options.include_usage`). The layers read what the answer carries and never change
//! the request; a gateway that wants every stream counted asks for the usage itself with
//! [`ask_for_usage`] and gives the caller back the stream it asked for with [`StripUsage`]
//! (the `aoai-tower` gateway does both).

#![forbid(unsafe_code)]

use std::fmt;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Request, Response};
use http_body::Body;
use tower::Service;

mod body;
mod caller;
pub mod future;
mod include;
mod layer;
pub mod limit;
mod scan;
mod usage;

pub use body::UsageBody;
pub use caller::{Caller, CallerLimits};
pub use include::{STRIP_HOLD_LIMIT, StripUsage, ask_for_usage};
pub use layer::UsageLayer;
pub use limit::{
    Admission, LimitExceeded, LimitKind, TokenLimit, TokenLimitLayer, TokenLimiter,
    estimate_request_tokens, estimate_tokens,
};
pub use scan::is_event_stream;
pub use usage::Usage;

use future::ResponseFuture;

/// How many bytes of a JSON answer (or of one stream event) are copied to be parsed, unless
/// [`UsageLayer::parse_up_to`] says otherwise: 1 MiB.
pub const DEFAULT_PARSE_LIMIT: usize = 1 << 20;

/// What one answer used, handed to the request's callback exactly once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UsageReport {
    /// The last usage the answer carried; `None` when it carried none, or none that could be read
    /// (not JSON or an event stream, encoded, over the parse limit, or the inner service failed).
    pub usage: Option<Usage>,
    /// The `model` named next to that usage (`response.model` in a Responses API event): the
    /// model that answered, as the instance reports it.
    pub model: Option<Box<str>>,
    /// The `id` of the answer's object (`chatcmpl-…`, `resp_…`, `file-…`, `batch_…`): of a
    /// JSON answer, or of the stream event that carried the usage (a Responses API stream's
    /// `response.completed`).
    pub id: Option<Box<str>>,
    /// Whether the body reached its end. `false` when it failed, or was dropped first (the caller
    /// went away mid-stream): `usage` is then what was seen up to there.
    pub complete: bool,
    /// When the body's first non-empty data frame passed: with the time the request was sent,
    /// the time to first token of a stream.
    pub first_data_at: Option<Instant>,
}

/// Receives one request's [`UsageReport`]; made per request by a [`MakeUsageCallback`].
///
/// Implemented for every `FnOnce(UsageReport)`. Implement it on a type of your own to see the
/// answer's head as well (its status, headers, extensions), before any of its body.
pub trait UsageCallback {
    /// Called with the inner service's response, before its body is read; not called when the
    /// inner service fails. Default: nothing.
    fn on_response<B>(&mut self, response: &Response<B>) {
        let _ = response;
    }

    /// Called exactly once, when the body ends, fails or is dropped, or when the inner service
    /// fails or its response future is dropped.
    fn on_report(self, report: UsageReport);
}

impl<F: FnOnce(UsageReport)> UsageCallback for F {
    fn on_report(self, report: UsageReport) {
        self(report);
    }
}

/// Makes the callback that receives a request's [`UsageReport`].
///
/// Implemented for every `FnMut(&Request<B>) -> C` where `C:` [`UsageCallback`] (such as any
/// `FnOnce(UsageReport)`): read what identifies the caller (an extension set by your auth, a
/// header, the deployment in the path) from the request, and return a closure that charges it.
pub trait MakeUsageCallback<B> {
    /// The callback, called once per request.
    type Callback: UsageCallback;

    /// Makes the callback for `request`, before it goes to the inner service.
    fn make_callback(&mut self, request: &Request<B>) -> Self::Callback;
}

impl<B, M, C> MakeUsageCallback<B> for M
where
    M: FnMut(&Request<B>) -> C,
    C: UsageCallback,
{
    type Callback = C;

    fn make_callback(&mut self, request: &Request<B>) -> C {
        self(request)
    }
}

/// Reads the token usage of each answer of the inner service as it streams past, and hands it to
/// a per-request callback made by `M` (see the [crate docs](crate)).
///
/// Readiness is the inner service's: `call` makes the callback and calls the inner service
/// directly, no clone involved. `Clone` when `S` and `M` are.
#[derive(Clone)]
pub struct CountUsage<S, M> {
    inner: S,
    make: M,
    limit: usize,
}

impl<S, M> CountUsage<S, M> {
    /// Wraps `inner`, making each request's callback with `make`.
    pub const fn new(inner: S, make: M) -> Self {
        Self {
            inner,
            make,
            limit: DEFAULT_PARSE_LIMIT,
        }
    }

    /// A [`UsageLayer`] that makes each request's callback with `make`.
    pub const fn layer(make: M) -> UsageLayer<M> {
        UsageLayer::new(make)
    }

    /// Parses JSON answers (and single stream events) up to `bytes` long; see
    /// [`UsageLayer::parse_up_to`].
    pub const fn parse_up_to(mut self, bytes: usize) -> Self {
        self.limit = bytes;
        self
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

impl<S, M, ReqBody, ResBody> Service<Request<ReqBody>> for CountUsage<S, M>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body,
    M: MakeUsageCallback<ReqBody>,
{
    type Response = Response<UsageBody<ResBody, M::Callback>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, M::Callback>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let callback = self.make.make_callback(&request);
        ResponseFuture::new(self.inner.call(request), callback, self.limit)
    }
}

impl<S: fmt::Debug, M> fmt::Debug for CountUsage<S, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CountUsage")
            .field("inner", &self.inner)
            .field("make", &std::any::type_name::<M>())
            .field("limit", &self.limit)
            .finish()
    }
}
