//! The response future of [`Upstream`](crate::Upstream).

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use http::Response;
use hyper::body::Incoming;
use pin_project_lite::pin_project;

use crate::{error::UpstreamError, headers::remove_hop_by_hop};

pin_project! {
    /// Response future of [`Upstream`](crate::Upstream): the backend's response with its
    /// hop-by-hop headers removed and its body untouched, or an [`UpstreamError`].
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture {
        #[pin]
        state: State,
    }
}

pin_project! {
    #[project = StateProj]
    enum State {
        // Waiting for the backend's response head.
        Sending { #[pin] future: hyper_util::client::legacy::ResponseFuture },
        // Refused before any backend contact; `None` once the error has been returned.
        Refused { error: Option<UpstreamError> },
    }
}

impl ResponseFuture {
    pub(crate) fn sending(future: hyper_util::client::legacy::ResponseFuture) -> Self {
        Self {
            state: State::Sending { future },
        }
    }

    pub(crate) fn refused(error: UpstreamError) -> Self {
        Self {
            state: State::Refused { error: Some(error) },
        }
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<Incoming>, UpstreamError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Sending { future } => match future.poll(cx) {
                Poll::Ready(Ok(mut response)) => {
                    remove_hop_by_hop(response.headers_mut());
                    Poll::Ready(Ok(response))
                }
                Poll::Ready(Err(error)) => Poll::Ready(Err(UpstreamError::Request(error))),
                Poll::Pending => Poll::Pending,
            },
            StateProj::Refused { error } => Poll::Ready(Err(error
                .take()
                .expect("ResponseFuture polled after completion"))),
        }
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Sending { .. } => "Sending",
            State::Refused { .. } => "Refused",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
