//! The [`AzureAuth`](crate::AzureAuth) response future.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};

use http::{Request, Response, StatusCode, header::AUTHORIZATION};
use pin_project_lite::pin_project;
use tower::{BoxError, Service};

use crate::cache::{TokenCache, TokenFuture};
use crate::error::CredentialRejected;

pin_project! {
    /// Response future of [`AzureAuth`](crate::AzureAuth).
    ///
    /// Calls the inner service at once when a token is cached (or in api-key mode); otherwise it
    /// first waits for the token. When the backend answers `401 Unauthorized`, it drops the token
    /// the request carried from the cache (see the crate docs, "401 contract").
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S, B>,
        // The cache the request's token came from, and the token's generation; `None` in api-key
        // mode.
        issued: Option<(TokenCache, u64)>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B>
    where
        S: Service<Request<B>>,
    {
        // No valid token was cached: wait for one, then call the ready service taken out of
        // `AzureAuth`. Boxed: it is rare, and inline it would make every request's future carry
        // room for a whole request.
        Token {
            waiting: Box<Waiting<S, B>>,
        },
        Called {
            #[pin]
            future: S::Future,
        },
    }
}

/// What a request waiting for a token holds.
struct Waiting<S, B> {
    token: TokenFuture,
    cache: Option<TokenCache>,
    call: Option<(S, Request<B>)>,
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    pub(crate) fn called(future: S::Future, issued: Option<(TokenCache, u64)>) -> Self {
        Self {
            state: State::Called { future },
            issued,
        }
    }

    pub(crate) fn waiting(cache: TokenCache, service: S, request: Request<B>) -> Self {
        Self {
            state: State::Token {
                waiting: Box::new(Waiting {
                    token: cache.acquire(),
                    cache: Some(cache),
                    call: Some((service, request)),
                }),
            },
            issued: None,
        }
    }
}

impl<S, B, RB> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<RB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Token { waiting } => {
                    let bearer = ready!(waiting.token.as_mut().poll(cx))?;
                    let (mut service, mut request) = waiting
                        .call
                        .take()
                        .expect("ResponseFuture polled after completion");
                    request.headers_mut().insert(AUTHORIZATION, bearer.header);
                    *this.issued = waiting.cache.take().map(|cache| (cache, bearer.generation));
                    let future = service.call(request);
                    this.state.set(State::Called { future });
                }
                StateProj::Called { future } => {
                    let mut response = ready!(future.poll(cx)).map_err(Into::into)?;
                    if response.status() == StatusCode::UNAUTHORIZED {
                        match this.issued.take() {
                            Some((cache, generation)) => cache.invalidate(generation),
                            // An api-key: no refresh can mend it.
                            None => {
                                response.extensions_mut().insert(CredentialRejected);
                            }
                        }
                    }
                    return Poll::Ready(Ok(response));
                }
            }
        }
    }
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Token { .. } => "waiting for a token",
            State::Called { .. } => "called",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}
