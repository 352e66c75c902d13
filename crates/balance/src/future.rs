//! [`ResponseFuture`] for [`Balance`](crate::Balance).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower::Service;
use tower::util::Oneshot;

use crate::error::BackendError;
use crate::{BoxError, Classify, ServedBy, Shared};

pin_project! {
    /// Response future of [`Balance`](crate::Balance): drives the chosen backend, then records
    /// the outcome (passive health) and which backend served it.
    #[derive(Debug)]
    pub struct ResponseFuture<S, B, C>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S, B>,
        shared: Arc<Shared>,
        classifier: C,
    }
}

pin_project! {
    #[project = StateProj]
    #[derive(Debug)]
    enum State<S, B>
    where
        S: Service<Request<B>>,
    {
        Called {
            #[pin]
            oneshot: Oneshot<S, Request<B>>,
            index: usize,
        },
        Refused {
            error: Option<BoxError>,
        },
    }
}

impl<S, B, C> ResponseFuture<S, B, C>
where
    S: Service<Request<B>>,
{
    pub(crate) fn called(
        oneshot: Oneshot<S, Request<B>>,
        index: usize,
        shared: Arc<Shared>,
        classifier: C,
    ) -> Self {
        Self {
            state: State::Called { oneshot, index },
            shared,
            classifier,
        }
    }

    pub(crate) fn refused(error: BoxError, shared: Arc<Shared>, classifier: C) -> Self {
        Self {
            state: State::Refused { error: Some(error) },
            shared,
            classifier,
        }
    }
}

impl<S, B, RB, C> Future for ResponseFuture<S, B, C>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
    C: Classify,
{
    type Output = Result<Response<RB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.state.project() {
            StateProj::Refused { error } => Poll::Ready(Err(error
                .take()
                .expect("ResponseFuture polled after completion"))),
            StateProj::Called { oneshot, index } => {
                let index = *index;
                let result = ready!(oneshot.poll(cx));
                let backend = &this.shared.backends[index];
                let served_by = ServedBy::new(backend.name.clone(), index);
                Poll::Ready(match result {
                    Ok(mut response) => {
                        let outcome = this
                            .classifier
                            .classify_response(response.status(), response.headers());
                        backend.observe(index, &outcome, &this.shared.policy, &this.shared.clock);
                        response.extensions_mut().insert(served_by);
                        Ok(response)
                    }
                    Err(error) => {
                        let error: BoxError = error.into();
                        let outcome = this.classifier.classify_error(&*error);
                        backend.observe(index, &outcome, &this.shared.policy, &this.shared.clock);
                        Err(Box::new(BackendError::new(served_by, error)))
                    }
                })
            }
        }
    }
}
