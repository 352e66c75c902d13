//! [`RequireClientKeyLayer`]: refuse callers without a configured client key.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use http::{HeaderMap, Request, Response, StatusCode, header};
use pin_project_lite::pin_project;
use subtle::{Choice, ConstantTimeEq};
use tower::{Layer, Service};

use crate::error::azure_error;

/// Refuses callers that do not present one of the configured client keys, as `api-key: KEY` or
/// `Authorization: Bearer KEY` (what the OpenAI and Azure SDKs send), with a 401 in Azure's
/// error shape. Keys are compared in constant time; they never appear in `Debug` output.
///
/// The caller's key is left on the request; the [`Gateway`](crate::Gateway) removes the
/// caller's credentials before any backend sees the request.
#[derive(Clone)]
pub struct RequireClientKeyLayer {
    keys: Arc<[Box<[u8]>]>,
}

impl RequireClientKeyLayer {
    /// Accepts any of `keys`; empty keys are ignored, so an empty list refuses everyone.
    pub fn new<I, K>(keys: I) -> Self
    where
        I: IntoIterator<Item = K>,
        K: AsRef<str>,
    {
        Self {
            keys: keys
                .into_iter()
                .filter_map(|key| {
                    let key = key.as_ref().trim();
                    (!key.is_empty()).then(|| key.as_bytes().into())
                })
                .collect(),
        }
    }

    /// How many keys are accepted.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is accepted (everyone is refused).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn accepts(&self, headers: &HeaderMap) -> bool {
        let presented = headers
            .get("api-key")
            .map(|value| value.as_bytes())
            .or_else(|| {
                headers
                    .get(header::AUTHORIZATION)
                    .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "))
            });
        let Some(presented) = presented else {
            return false;
        };
        // Compare against every key, without stopping at a match.
        let matched = self.keys.iter().fold(Choice::from(0), |matched, key| {
            matched | key.ct_eq(presented)
        });
        matched.into()
    }
}

impl fmt::Debug for RequireClientKeyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequireClientKeyLayer")
            .field("keys", &format_args!("[{} redacted]", self.keys.len()))
            .finish()
    }
}

impl<S> Layer<S> for RequireClientKeyLayer {
    type Service = RequireClientKey<S>;

    fn layer(&self, inner: S) -> RequireClientKey<S> {
        RequireClientKey {
            inner,
            keys: self.clone(),
        }
    }
}

/// The service of [`RequireClientKeyLayer`].
#[derive(Debug, Clone)]
pub struct RequireClientKey<S> {
    inner: S,
    keys: RequireClientKeyLayer,
}

impl<S> RequireClientKey<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B> Service<Request<B>> for RequireClientKey<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = ClientKeyFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if self.keys.accepts(request.headers()) {
            ClientKeyFuture::Inner {
                future: self.inner.call(request),
            }
        } else {
            ClientKeyFuture::Refused {
                response: Some(azure_error(
                    StatusCode::UNAUTHORIZED,
                    "401",
                    "Access denied: a valid client key is required, as `api-key` or \
                     `Authorization: Bearer`.",
                )),
            }
        }
    }
}

pin_project! {
    /// Response future of [`RequireClientKey`].
    #[project = ClientKeyFutureProj]
    #[derive(Debug)]
    pub enum ClientKeyFuture<F> {
        /// The caller was accepted.
        Inner {
            #[pin]
            future: F,
        },
        /// The caller was refused.
        Refused {
            response: Option<Response<Body>>,
        },
    }
}

impl<F, E> Future for ClientKeyFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ClientKeyFutureProj::Inner { future } => future.poll(cx),
            ClientKeyFutureProj::Refused { response } => Poll::Ready(Ok(response
                .take()
                .expect("ClientKeyFuture polled after completion"))),
        }
    }
}
