//! The response future of [`Upstream`](crate::Upstream).

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use http::Response;

use crate::{body::UpstreamBody, error::UpstreamError};

type Exchange = Pin<Box<dyn Future<Output = Result<Response<UpstreamBody>, UpstreamError>> + Send>>;

/// Response future of [`Upstream`](crate::Upstream): the backend's response with its
/// hop-by-hop headers removed and its body streaming, or an [`UpstreamError`].
#[must_use = "futures do nothing unless polled"]
pub struct ResponseFuture {
    state: State,
}

enum State {
    // Sending the request and reading the response head.
    Sending(Exchange),
    // Refused before any backend contact; `None` once the error has been returned.
    Refused(Option<UpstreamError>),
}

impl ResponseFuture {
    pub(crate) fn sending(exchange: Exchange) -> Self {
        Self {
            state: State::Sending(exchange),
        }
    }

    pub(crate) fn refused(error: UpstreamError) -> Self {
        Self {
            state: State::Refused(Some(error)),
        }
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<UpstreamBody>, UpstreamError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.state {
            State::Sending(exchange) => exchange.as_mut().poll(cx),
            State::Refused(error) => Poll::Ready(Err(error
                .take()
                .expect("ResponseFuture polled after completion"))),
        }
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Sending(_) => "Sending",
            State::Refused(_) => "Refused",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
