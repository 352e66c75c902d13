//! [`ResponseFuture`] for [`Balance`](crate::Balance).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower::util::Oneshot;
use tower::{BoxError, Service};

use crate::error::BackendError;
use crate::health::Attempt;
use crate::{Classify, Deployment, ServedBy, Shared};

pin_project! {
    /// Response future of [`Balance`](crate::Balance): drives a clone of the chosen backend to
    /// readiness and calls it, then records the outcome (passive health) and which backend
    /// served it.
    ///
    /// When the request is a backend's trial (see [`HealthPolicy`](crate::HealthPolicy)),
    /// dropping this future before the backend answers frees the trial slot, so the next
    /// request is the trial.
    pub struct ResponseFuture<S, B, C>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S, B>,
        health: Health,
        classifier: C,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B>
    where
        S: Service<Request<B>>,
    {
        // The clone of backend `index`, awaiting its readiness, then its response.
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
    /// `trial`: the request is backend `index`'s trial, its slot claimed by the pick. `retry`:
    /// the request carried a non-empty [`TriedBackends`](crate::TriedBackends).
    pub(crate) fn called(
        oneshot: Oneshot<S, Request<B>>,
        index: usize,
        trial: bool,
        retry: bool,
        deployment: Option<Deployment>,
        shared: Arc<Shared>,
        classifier: C,
    ) -> Self {
        Self {
            state: State::Called { oneshot, index },
            health: Health {
                shared,
                trial: trial.then_some(index),
                retry,
                deployment,
            },
            classifier,
        }
    }

    pub(crate) fn refused(error: BoxError, shared: Arc<Shared>, classifier: C) -> Self {
        Self {
            state: State::Refused { error: Some(error) },
            health: Health {
                shared,
                trial: None,
                retry: false,
                deployment: None,
            },
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
                Poll::Ready(finish(result, index, this.health, this.classifier))
            }
        }
    }
}

impl<S, B, C> fmt::Debug for ResponseFuture<S, B, C>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (state, index) = match &self.state {
            State::Called { index, .. } => ("called", Some(index)),
            State::Refused { .. } => ("refused", None),
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field(
                "backend",
                &index.map(|&i| &*self.health.shared.backends[i].name),
            )
            .field("trial", &self.health.trial.is_some())
            .finish_non_exhaustive()
    }
}

/// The balance's shared health, and the trial slot this call holds, if any: released on drop
/// unless the trial was answered (a guard, so a caller going away never leaves a backend on
/// trial with a trial in flight forever).
struct Health {
    shared: Arc<Shared>,
    /// The backend whose trial this call is, until the trial is answered.
    trial: Option<usize>,
    /// Whether the request is a retry (it carried a non-empty `TriedBackends`).
    retry: bool,
    /// The deployment the request is for, if it said.
    deployment: Option<Deployment>,
}

impl Drop for Health {
    fn drop(&mut self) {
        if let Some(index) = self.trial {
            self.shared.backends[index].release_trial();
        }
    }
}

/// Records the outcome of a call to backend `index` in its health, and which backend served it.
fn finish<RB, E, C>(
    result: Result<Response<RB>, E>,
    index: usize,
    health: &mut Health,
    classifier: &C,
) -> Result<Response<RB>, BoxError>
where
    E: Into<BoxError>,
    C: Classify,
{
    let backend = &health.shared.backends[index];
    let served_by = ServedBy::new(backend.name.clone(), index);
    let (outcome, result) = match result {
        Ok(mut response) => {
            let outcome = classifier.classify_answer(&response);
            response.extensions_mut().insert(served_by);
            if let Some(deployment) = &health.deployment {
                // For a layer above (the retry policy) whose copy of the request does not say.
                response.extensions_mut().insert(deployment.clone());
            }
            (outcome, Ok(response))
        }
        Err(error) => {
            let error: BoxError = error.into();
            let outcome = classifier.classify_error(&*error);
            let error: BoxError = Box::new(BackendError::new(served_by, error));
            (outcome, Err(error))
        }
    };
    // The trial (if this was one) is answered: `observe` settles it, so the guard is disarmed.
    let trial = health.trial.take() == Some(index);
    let shared = &*health.shared;
    shared.backends[index].observe(
        index,
        &outcome,
        &shared.policy,
        &shared.clock,
        Attempt {
            trial,
            retry: health.retry,
            deployment: health.deployment.as_ref(),
        },
    );
    result
}
