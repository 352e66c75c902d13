//! [`ResponseFuture`] for [`RetryNextBackendService`](crate::RetryNextBackendService).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::Request;
use http::request::Parts;
use http_body::Body;
use http_body_util::{LengthLimitError, Limited};
use pin_project_lite::pin_project;
use tower::Service;

use crate::error::{BodyReadError, BodyTooLarge};
use crate::{BoxError, ReplayBody};

pin_project! {
    /// Response future of [`RetryNextBackendService`](crate::RetryNextBackendService): reads the
    /// request body once, then drives the attempts.
    pub struct ResponseFuture<R, B>
    where
        R: Service<Request<ReplayBody>>,
        B: Body,
        B::Error: Into<BoxError>,
    {
        #[pin]
        state: State<R, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<R, B>
    where
        R: Service<Request<ReplayBody>>,
        B: Body,
        B::Error: Into<BoxError>,
    {
        Reading {
            #[pin]
            body: Limited<B>,
            read: BodyBytes,
            parts: Option<Parts>,
            retry: Option<R>,
            limit: usize,
        },
        Sending {
            #[pin]
            future: R::Future,
        },
        Refused {
            error: Option<BoxError>,
        },
    }
}

impl<R, B> ResponseFuture<R, B>
where
    R: Service<Request<ReplayBody>>,
    B: Body,
    B::Error: Into<BoxError>,
{
    pub(crate) fn reading(request: Request<B>, retry: R, limit: usize) -> Self {
        let (parts, body) = request.into_parts();
        Self {
            state: State::Reading {
                body: Limited::new(body, limit),
                read: BodyBytes::default(),
                parts: Some(parts),
                retry: Some(retry),
                limit,
            },
        }
    }

    pub(crate) fn refused(error: BoxError) -> Self {
        Self {
            state: State::Refused { error: Some(error) },
        }
    }
}

impl<R, B> Future for ResponseFuture<R, B>
where
    R: Service<Request<ReplayBody>, Error = BoxError>,
    B: Body,
    B::Error: Into<BoxError>,
{
    type Output = Result<R::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Reading {
                    mut body,
                    read,
                    parts,
                    retry,
                    limit,
                } => {
                    let bytes = loop {
                        match ready!(body.as_mut().poll_frame(cx)) {
                            None => break read.take(),
                            Some(Ok(frame)) => {
                                // Trailers are not replayed.
                                if let Ok(data) = frame.into_data() {
                                    read.push(data);
                                }
                            }
                            Some(Err(error)) if error.is::<LengthLimitError>() => {
                                return Poll::Ready(Err(Box::new(BodyTooLarge::new(*limit))));
                            }
                            Some(Err(error)) => {
                                return Poll::Ready(Err(Box::new(BodyReadError::new(error))));
                            }
                        }
                    };
                    let parts = parts
                        .take()
                        .expect("ResponseFuture polled after completion");
                    let mut retry = retry
                        .take()
                        .expect("ResponseFuture polled after completion");
                    let request = Request::from_parts(parts, ReplayBody::new(bytes));
                    // `retry` was polled ready before it was moved in here (see `call`).
                    let future = retry.call(request);
                    this.state.set(State::Sending { future });
                }
                StateProj::Sending { future } => return future.poll(cx),
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

impl<R, B> std::fmt::Debug for ResponseFuture<R, B>
where
    R: Service<Request<ReplayBody>>,
    B: Body,
    B::Error: Into<BoxError>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
