//! [`IncludeUsageLayer`]: streamed chat completions report their usage, whether the caller
//! asked or not.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use aoai_retry::ReplayBody;
use http::{Method, Request, Response, header};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

/// Asks each streamed chat completion for its usage (`stream_options.include_usage: true`)
/// when the caller did not, and marks its answer with [`UsageAdded`] so the answer can be given
/// back to the caller as it asked for it ([`aoai_usage::StripUsage`]: the extra usage chunk and
/// the `"usage":null` members removed). A caller that asked for the usage keeps it.
///
/// Works on the body the retry layer has read ([`ReplayBody`]), below it: the
/// [`Gateway`](crate::Gateway) puts it there when built with
/// [`GatewayBuilder::include_usage`](crate::GatewayBuilder::include_usage), and removes what
/// the caller did not ask for itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct IncludeUsageLayer;

impl<S> Layer<S> for IncludeUsageLayer {
    type Service = IncludeUsage<S>;

    fn layer(&self, inner: S) -> IncludeUsage<S> {
        IncludeUsage::new(inner, true)
    }
}

/// The service of [`IncludeUsageLayer`].
#[derive(Debug, Clone)]
pub struct IncludeUsage<S> {
    inner: S,
    enabled: bool,
}

impl<S> IncludeUsage<S> {
    /// `enabled == false`: passes every request as it is (the gateway's stack has the layer
    /// whether the setting is on or not).
    pub(crate) fn new(inner: S, enabled: bool) -> Self {
        Self { inner, enabled }
    }
}

/// A response extension: the gateway added `stream_options.include_usage` to the request, so
/// the answer carries usage the caller did not ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageAdded;

impl<S, B> Service<Request<ReplayBody>> for IncludeUsage<S>
where
    S: Service<Request<ReplayBody>, Response = Response<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = IncludeUsageFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReplayBody>) -> Self::Future {
        let added = self.enabled
            && request.method() == Method::POST
            && request.uri().path().ends_with("/chat/completions")
            && match aoai_usage::ask_for_usage(request.body().as_bytes()) {
                Some(body) => {
                    replace_body(&mut request, body);
                    true
                }
                None => false,
            };
        IncludeUsageFuture {
            inner: self.inner.call(request),
            added,
        }
    }
}

/// Puts `body` in place of the request's body, with its `Content-Length`.
pub(crate) fn replace_body(request: &mut Request<ReplayBody>, body: Vec<u8>) {
    request
        .headers_mut()
        .insert(header::CONTENT_LENGTH, body.len().into());
    *request.body_mut() = ReplayBody::new(body.into());
}

pin_project! {
    /// Response future of [`IncludeUsage`]: the inner one, its answer marked with
    /// [`UsageAdded`] when the request was changed.
    #[derive(Debug)]
    pub struct IncludeUsageFuture<F> {
        #[pin]
        inner: F,
        added: bool,
    }
}

impl<F, B, E> Future for IncludeUsageFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let mut result = ready!(this.inner.poll(cx));
        if *this.added
            && let Ok(response) = &mut result
        {
            response.extensions_mut().insert(UsageAdded);
        }
        Poll::Ready(result)
    }
}
