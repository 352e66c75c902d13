//! [`ResponseFuture`] of [`CountUsage`](crate::CountUsage).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Response;
use http_body::Body;
use pin_project_lite::pin_project;

use crate::UsageCallback;
use crate::body::{Counter, UsageBody};

pin_project! {
    /// Response future of [`CountUsage`](crate::CountUsage): the inner future, its response's
    /// body wrapped in a [`UsageBody`].
    ///
    /// If the inner service fails, or this future is dropped before its response, the callback is
    /// called with `usage: None, complete: false`.
    pub struct ResponseFuture<Fut, F>
    where
        F: UsageCallback,
    {
        #[pin]
        inner: Fut,
        counter: Option<Counter<F>>,
        limit: usize,
    }
}

impl<Fut, F> ResponseFuture<Fut, F>
where
    F: UsageCallback,
{
    pub(crate) fn new(inner: Fut, callback: F, limit: usize) -> Self {
        Self {
            inner,
            counter: Some(Counter::new(callback)),
            limit,
        }
    }
}

impl<Fut, F, B, E> Future for ResponseFuture<Fut, F>
where
    Fut: Future<Output = Result<Response<B>, E>>,
    B: Body,
    F: UsageCallback,
{
    type Output = Result<Response<UsageBody<B, F>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let mut counter = this
            .counter
            .take()
            .expect("ResponseFuture polled after completion");
        Poll::Ready(match result {
            Ok(response) => Ok(counter.wrap(response, Some(*this.limit))),
            Err(error) => {
                counter.finish(false);
                Err(error)
            }
        })
    }
}

impl<Fut, F> fmt::Debug for ResponseFuture<Fut, F>
where
    Fut: fmt::Debug,
    F: UsageCallback,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("inner", &self.inner)
            .field("counter", &self.counter)
            .finish()
    }
}
