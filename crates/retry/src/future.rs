//! [`ResponseFuture`] for [`RetryNextBackendService`](crate::RetryNextBackendService).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use aoai_balance::{AzureOpenAiClassifier, Classify};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::request::Parts;
use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower::{BoxError, Service};

use crate::deadline::{Deadline, DeadlineSettings};
use crate::error::{BodyReadError, BodyTooLarge, DeadlineElapsed};
use crate::linger::Linger;
use crate::policy::RequestCopy;
use crate::{Backoff, ReplayBody, RetryNextBackend};

pin_project! {
    /// Response future of [`RetryNextBackendService`](crate::RetryNextBackendService): reads the
    /// request body once, then drives the attempts, asking the [`RetryNextBackend`] policy after
    /// each whether to retry.
    pub struct ResponseFuture<S, B, C = AzureOpenAiClassifier>
    where
        S: Service<Request<ReplayBody>>,
        B: Body,
        B::Error: Into<BoxError>,
    {
        #[pin]
        state: State<S::Future, B>,
        #[pin]
        deadline: Deadline,
        // The service `poll_ready` made ready, taken out of `RetryNextBackendService`.
        service: S,
        policy: RetryNextBackend<C>,
        // What a retry sends: a copy of the request, kept while the policy may still retry.
        retry_copy: Option<RequestCopy>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, B>
    where
        B: Body,
        B::Error: Into<BoxError>,
    {
        Reading {
            // Taken out when it is over the limit, to linger on (see `Linger`).
            body: Option<B>,
            read: BodyBytes,
            parts: Option<Parts>,
            limit: usize,
            linger: Linger,
        },
        Called {
            #[pin]
            future: F,
        },
        Waiting {
            #[pin]
            backoff: Backoff,
            request: Option<Request<ReplayBody>>,
        },
        Retrying {
            request: Option<Request<ReplayBody>>,
        },
        Refused {
            error: Option<BoxError>,
        },
    }
}

impl<S, B, C> ResponseFuture<S, B, C>
where
    S: Service<Request<ReplayBody>>,
    B: Body,
    B::Error: Into<BoxError>,
{
    pub(crate) fn reading(
        request: Request<B>,
        service: S,
        policy: RetryNextBackend<C>,
        limit: usize,
        deadline: Option<DeadlineSettings>,
        linger: Linger,
    ) -> Self {
        let (parts, body) = request.into_parts();
        Self {
            state: State::Reading {
                body: Some(body),
                read: BodyBytes::default(),
                parts: Some(parts),
                limit,
                linger,
            },
            deadline: Deadline::new(deadline),
            service,
            policy,
            retry_copy: None,
        }
    }

    pub(crate) fn refused(error: BoxError, service: S, policy: RetryNextBackend<C>) -> Self {
        Self {
            state: State::Refused { error: Some(error) },
            deadline: Deadline::new(None),
            service,
            policy,
            retry_copy: None,
        }
    }
}

impl<S, B, RB, C> Future for ResponseFuture<S, B, C>
where
    S: Service<Request<ReplayBody>, Response = Response<RB>, Error = BoxError>,
    B: Body + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
    C: Classify,
{
    type Output = Result<Response<RB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            if let Some(limit) = this.deadline.as_mut().elapsed(cx) {
                // Whatever was under way (an attempt, a backoff) is dropped.
                this.state.set(State::Refused { error: None });
                return Poll::Ready(Err(Box::new(DeadlineElapsed::new(limit))));
            }
            match this.state.as_mut().project() {
                StateProj::Reading {
                    body: body_slot,
                    read,
                    parts,
                    limit,
                    linger,
                } => {
                    let body = body_slot
                        .as_mut()
                        .expect("ResponseFuture polled after completion");
                    let bytes = loop {
                        let Poll::Ready(frame) = Pin::new(&mut *body).poll_frame(cx) else {
                            // A body still arriving: the deadline bounds it.
                            if this.deadline.as_mut().arm() {
                                break None;
                            }
                            return Poll::Pending;
                        };
                        match frame {
                            None => break Some(read.take()),
                            Some(Ok(frame)) => {
                                // Trailers are not replayed.
                                if let Ok(data) = frame.into_data() {
                                    if data.remaining() > *limit - read.len() {
                                        // The caller is answered at once; the rest of its body
                                        // is read and dropped meanwhile.
                                        if let Some(body) = body_slot.take() {
                                            linger.spawn(body);
                                        }
                                        return Poll::Ready(Err(Box::new(BodyTooLarge::new(
                                            *limit,
                                        ))));
                                    }
                                    read.push(data);
                                }
                                // A body that says it has ended is not polled again: hyper's
                                // would ask its connection for more first, waking the task
                                // for nothing.
                                if body.is_end_stream() {
                                    break Some(read.take());
                                }
                            }
                            Some(Err(error)) => {
                                return Poll::Ready(Err(Box::new(BodyReadError::new(
                                    error.into(),
                                ))));
                            }
                        }
                    };
                    // Just armed: polled at the top of the loop, which registers its waker.
                    let Some(bytes) = bytes else { continue };
                    let parts = parts
                        .take()
                        .expect("ResponseFuture polled after completion");
                    let request = Request::from_parts(parts, ReplayBody::new(bytes));
                    // The first attempt gets the request itself (whose header map may have room
                    // to spare), and a copy is kept for a retry.
                    *this.retry_copy = Some(RequestCopy::of(&request));
                    this.deadline.as_mut().attempt_starts(true);
                    // The service was polled ready before it was moved in here (see `call`).
                    let future = this.service.call(request);
                    this.state.set(State::Called { future });
                }
                StateProj::Called { future } => {
                    let mut result = ready!(future.poll(cx));
                    // A success or a final answer goes back as it is, the copy unused.
                    let Some(copy) = this.retry_copy else {
                        return Poll::Ready(result);
                    };
                    let Some(outcome) = this.policy.retryable_outcome(&result) else {
                        return Poll::Ready(result);
                    };
                    let mut request = copy.to_request();
                    match this.policy.decide_retry(outcome, &mut request, &mut result) {
                        Some(backoff) => {
                            this.deadline.as_mut().arm();
                            this.state.set(State::Waiting {
                                backoff,
                                request: Some(request),
                            });
                        }
                        None => return Poll::Ready(result),
                    }
                }
                StateProj::Waiting { backoff, request } => {
                    ready!(backoff.poll(cx));
                    let request = request.take();
                    this.state.set(State::Retrying { request });
                }
                StateProj::Retrying { request } => {
                    ready!(this.service.poll_ready(cx))?;
                    let request = request
                        .take()
                        .expect("a retry is given its request when it is decided");
                    *this.retry_copy = Some(RequestCopy::of(&request));
                    this.deadline.as_mut().attempt_starts(false);
                    let future = this.service.call(request);
                    this.state.set(State::Called { future });
                }
                StateProj::Refused { error } => {
                    return Poll::Ready(Err(error
                        .take()
                        .expect("ResponseFuture polled after completion")));
                }
            }
        }
    }
}

/// A body's bytes as they arrive: a body of one frame (hyper's, for a request that arrived in
/// one read) is kept as that frame, without a copy or an allocation; more frames are joined.
#[derive(Default)]
struct BodyBytes {
    first: Bytes,
    joined: Option<BytesMut>,
}

impl BodyBytes {
    /// How many bytes were read so far.
    fn len(&self) -> usize {
        self.joined
            .as_ref()
            .map_or(self.first.len(), |joined| joined.len())
    }

    fn push(&mut self, mut data: impl Buf) {
        if let Some(joined) = &mut self.joined {
            joined.put(data);
        } else if self.first.is_empty() {
            self.first = data.copy_to_bytes(data.remaining());
        } else if data.has_remaining() {
            let mut joined = BytesMut::with_capacity(self.first.len() + data.remaining());
            joined.put(std::mem::take(&mut self.first));
            joined.put(data);
            self.joined = Some(joined);
        }
    }

    fn take(&mut self) -> Bytes {
        match self.joined.take() {
            Some(joined) => joined.freeze(),
            None => std::mem::take(&mut self.first),
        }
    }
}

impl<S, B, C> std::fmt::Debug for ResponseFuture<S, B, C>
where
    S: Service<Request<ReplayBody>>,
    B: Body,
    B::Error: Into<BoxError>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Reading { .. } => "reading the body",
            State::Called { .. } => "waiting for a backend",
            State::Waiting { .. } => "backing off",
            State::Retrying { .. } => "retrying",
            State::Refused { .. } => "refused",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}
