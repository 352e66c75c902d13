//! [`TokenLimitFuture`] of [`TokenLimit`](super::TokenLimit).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Response;
use http_body::Body;
use pin_project_lite::pin_project;
use tower::BoxError;

use super::{Admission, LimitExceeded};
use crate::UsageBody;
use crate::body::Counter;

pin_project! {
    /// Response future of [`TokenLimit`](super::TokenLimit): the inner service's future, its
    /// answer's body wrapped in a [`UsageBody`] that settles the request's [`Admission`] when it
    /// ends, fails or is dropped; or, for a request over its caller's limit, the
    /// [`LimitExceeded`] error at once.
    ///
    /// If the inner service fails, or this future is dropped before its answer, the estimate
    /// stands.
    #[derive(Debug)]
    pub struct TokenLimitFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    #[derive(Debug)]
    enum State<F> {
        Called {
            #[pin]
            future: F,
            admission: Option<Admission>,
            parse_limit: usize,
        },
        Refused {
            error: Option<LimitExceeded>,
        },
    }
}

impl<F> TokenLimitFuture<F> {
    pub(crate) fn called(future: F, admission: Admission, parse_limit: usize) -> Self {
        Self {
            state: State::Called {
                future,
                admission: Some(admission),
                parse_limit,
            },
        }
    }

    pub(crate) fn refused(error: LimitExceeded) -> Self {
        Self {
            state: State::Refused { error: Some(error) },
        }
    }
}

impl<F, B, E> Future for TokenLimitFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
    E: Into<BoxError>,
{
    type Output = Result<Response<UsageBody<B, Admission>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Refused { error } => Poll::Ready(Err(error
                .take()
                .expect("TokenLimitFuture polled after completion")
                .into())),
            StateProj::Called {
                future,
                admission,
                parse_limit,
            } => {
                let result = ready!(future.poll(cx));
                let admission = admission
                    .take()
                    .expect("TokenLimitFuture polled after completion");
                // On an error `admission` is dropped: the estimate stands.
                let response = result.map_err(Into::into)?;
                // The same reading as `CountUsage`'s, skipped when nothing is to be settled.
                let parse_limit = admission.wants_usage().then_some(*parse_limit);
                Poll::Ready(Ok(Counter::new(admission).wrap(response, parse_limit)))
            }
        }
    }
}
