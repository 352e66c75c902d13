//! A tower layer that rebases each request onto one instance's base URL.
//!
//! # Example
//!
//! ```
//! use aoai_rebase::RebaseLayer;
//! use http::{Request, Response};
//! use tower::{BoxError, ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let echo = service_fn(|request: Request<String>| async move {
//!     // A client would send `request` to the URI it carries; this one answers with it.
//!     Ok::<_, BoxError>(Response::new(request.uri().to_string()))
//! });
//! let service = ServiceBuilder::new()
//!     .layer(RebaseLayer::new("https://my-instance.openai.azure.com/openai")?)
//!     .service(echo);
//!
//! let request = Request::post("/deployments/gpt-4o/chat/completions?api-version=2024-10-21")
//!     .body(String::new())?;
//! let response = service.clone().oneshot(request).await?;
//! assert_eq!(
//!     response.body(),
//!     "https://my-instance.openai.azure.com/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
//! );
//!
//! // A path that could climb out of `/openai` never reaches the inner service.
//! let request = Request::get("/deployments/%2e%2e/%2e%2e/admin").body(String::new())?;
//! let error = service.oneshot(request).await.unwrap_err();
//! assert!(error.is::<aoai_rebase::InvalidPath>());
//! # Ok(())
//! # }
//! ```
//!
//! [`Rebase`] sits right above the client that sends requests to an instance (such as
//! aoai-upstream's `UpstreamClient`, or any tower `Service` of `http::Request`s that takes an
//! absolute URI). It changes the request and the response as a reverse proxy does, and nothing
//! else: every other header and the bodies pass untouched.
//!
//! # What is rewritten
//!
//! - **URI**: scheme and authority become the instance's; the path becomes the base path followed
//!   by the request path, and the query is kept (`/openai` + `/deployments/d/chat/completions?x=1`
//!   gives `/openai/deployments/d/chat/completions?x=1`, with one slash at the joint). The
//!   caller's scheme and authority, if any, are ignored.
//! - **`Host`**: the caller's is removed; the client sets the instance's from the URI.
//! - **Hop-by-hop header fields** are removed from the request and from the response:
//!   `Connection` and every field it names, `Keep-Alive`, `TE`, `Trailer`, `Transfer-Encoding`,
//!   `Upgrade`, and every `Proxy-*` field. A message that carried `Transfer-Encoding` loses its
//!   `Content-Length` too (RFC 9112, section 6.3): a backend that sends both must not get its body
//!   cut short by a length that did not frame it. This runs below the middleware above it, so a
//!   caller's `Connection: authorization` removes a credential that middleware set.
//! - **Response heads** larger than [`MAX_RESPONSE_HEAD`] (64 KiB of header fields) fail with
//!   [`ResponseHeadTooLarge`]; the answer is dropped. (Set the client's own limit too, so that it
//!   does not buffer much more: hyper's HTTP/1.1 `max_buf_size` can be passed by a head that
//!   arrives in one read.)
//! - **Upgrades**: a request with the `upgrade` option in `Connection` and an `Upgrade` field
//!   keeps `Upgrade` and `Connection: upgrade` (the other hop-by-hop fields still go), and so
//!   does a `101 Switching Protocols` response, so a WebSocket can pass.
//!
//! # Refused paths
//!
//! A request path with a `.` or `..` segment (plain, percent-encoded up to three times, or with a
//! `;` parameter such as `..;`), an encoded slash or backslash, a backslash, a malformed escape,
//! or escapes that decode to bytes that are not UTF-8 fails with [`InvalidPath`] without calling
//! the inner service, so a path can never climb out of the base path. So does a request target
//! that is not a path (`*`, authority form).
#![forbid(unsafe_code)]

mod base;
mod error;
mod headers;
mod path;

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use http::{Request, Response, StatusCode, Uri, Version, header};
use pin_project_lite::pin_project;
use tower::{BoxError, Layer, Service};

use crate::base::Base;
pub use crate::error::{InvalidBaseUrl, InvalidPath, ResponseHeadTooLarge};

/// The largest response head [`Rebase`] passes on, counted as its header fields take in an
/// HTTP/1.1 head (64 KiB). A larger one fails with [`ResponseHeadTooLarge`].
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Applies [`Rebase`] with one instance's base URL.
///
/// Cloning is cheap (a reference count): one layer per instance, applied to as many services as
/// needed.
#[derive(Clone)]
pub struct RebaseLayer {
    base: Arc<Base>,
}

impl RebaseLayer {
    /// A layer rebasing requests onto `base_url`.
    ///
    /// `base_url` is `https://host[:port][/base/path]`, or `http://` for a loopback host
    /// (`localhost`, `127.0.0.0/8`, `[::1]`) such as a local emulator. A trailing slash is
    /// ignored. It may not have a query string, a fragment, credentials, or dot segments in its
    /// path.
    ///
    /// # Errors
    ///
    /// [`InvalidBaseUrl`] naming what is wrong with `base_url`.
    pub fn new(base_url: &str) -> Result<Self, InvalidBaseUrl> {
        Ok(Self {
            base: Arc::new(Base::parse(base_url)?),
        })
    }

    /// The base URL, as given to [`RebaseLayer::new`].
    pub fn base_url(&self) -> &Uri {
        &self.base.url
    }
}

impl fmt::Debug for RebaseLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RebaseLayer")
            .field("base_url", &self.base.url)
            .finish()
    }
}

impl<S> Layer<S> for RebaseLayer {
    type Service = Rebase<S>;

    fn layer(&self, inner: S) -> Rebase<S> {
        Rebase {
            inner,
            base: Arc::clone(&self.base),
        }
    }
}

/// Rebases each request onto an instance's base URL and removes hop-by-hop header fields both
/// ways; see the [crate docs](crate).
///
/// Made by [`RebaseLayer`]. Its errors are a [`BoxError`]: the inner service's, an
/// [`InvalidPath`] for a refused request, or [`ResponseHeadTooLarge`].
#[derive(Clone)]
pub struct Rebase<S> {
    inner: S,
    base: Arc<Base>,
}

impl<S> Rebase<S> {
    /// A reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// A mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: fmt::Debug> fmt::Debug for Rebase<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rebase")
            .field("inner", &self.inner)
            .field("base_url", &self.base.url)
            .finish()
    }
}

impl<S, B, RB> Service<Request<B>> for Rebase<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<RB>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        // A refused request leaves the inner service ready, its reservation unused, for the next.
        let uri = match self.base.rebase(request.uri()) {
            Ok(uri) => uri,
            Err(error) => return ResponseFuture::refused(error),
        };
        *request.uri_mut() = uri;
        let keep_upgrade = headers::is_upgrade(request.headers());
        let fields = request.headers_mut();
        fields.remove(header::HOST);
        headers::remove_hop_by_hop(fields, keep_upgrade);
        ResponseFuture::called(self.inner.call(request))
    }
}

pin_project! {
    /// Response future of [`Rebase`]: the inner service's response with its hop-by-hop header
    /// fields removed, or the refusal of the request.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    #[derive(Debug)]
    enum State<F> {
        Called { #[pin] future: F },
        Refused { error: Option<InvalidPath> },
    }
}

impl<F> ResponseFuture<F> {
    fn called(future: F) -> Self {
        Self {
            state: State::Called { future },
        }
    }

    fn refused(error: InvalidPath) -> Self {
        Self {
            state: State::Refused { error: Some(error) },
        }
    }
}

impl<F, RB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<RB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Called { future } => {
                let mut response = ready!(future.poll(cx)).map_err(Into::into)?;
                if headers::head_size(response.headers()) > MAX_RESPONSE_HEAD {
                    return Poll::Ready(Err(ResponseHeadTooLarge::new().into()));
                }
                let keep_upgrade = response.status() == StatusCode::SWITCHING_PROTOCOLS
                    && headers::is_upgrade(response.headers());
                headers::remove_hop_by_hop(response.headers_mut(), keep_upgrade);
                // The version is the hop's to the instance (HTTP/2 by ALPN, or an old
                // server's HTTP/1.0), not the caller's: the caller's server answers in its own.
                *response.version_mut() = Version::HTTP_11;
                Poll::Ready(Ok(response))
            }
            StateProj::Refused { error } => Poll::Ready(Err(error
                .take()
                .expect("ResponseFuture polled after completion")
                .into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        convert::Infallible,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use http::{HeaderMap, HeaderValue};
    use tower::{ServiceExt, service_fn};

    use super::*;

    /// Rebase over a service that counts its calls and answers with the request it got (URI and
    /// headers) and the response `respond` makes.
    fn service(
        base_url: &str,
        respond: fn() -> Response<()>,
    ) -> (
        impl Service<Request<()>, Response = Response<Request<()>>, Error = BoxError> + Clone,
        Arc<AtomicUsize>,
    ) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let inner = service_fn(move |request: Request<()>| {
            counted.fetch_add(1, Ordering::SeqCst);
            let (head, ()) = respond().into_parts();
            async move { Ok::<_, Infallible>(Response::from_parts(head, request)) }
        });
        let layer = RebaseLayer::new(base_url).unwrap();
        (layer.layer(inner), calls)
    }

    fn ok() -> Response<()> {
        Response::new(())
    }

    #[tokio::test]
    async fn the_inner_service_gets_the_absolute_uri_without_host_or_hop_by_hop() {
        let (service, calls) = service("http://127.0.0.1:8080/openai/", ok);
        let request = Request::post("/deployments/d/chat/completions?api-version=1")
            .header("host", "gateway.example")
            .header("connection", "x-secret")
            .header("x-secret", "dropped")
            .header("te", "trailers")
            .header("content-type", "application/json")
            .body(())
            .unwrap();
        let response = service.oneshot(request).await.unwrap();
        let seen = response.body();
        assert_eq!(
            seen.uri(),
            "http://127.0.0.1:8080/openai/deployments/d/chat/completions?api-version=1"
        );
        let mut expected = HeaderMap::new();
        expected.insert("content-type", HeaderValue::from_static("application/json"));
        assert_eq!(seen.headers(), &expected);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn dot_segments_are_refused_without_calling_the_inner_service() {
        let (service, calls) = service("https://x.openai.azure.com/openai", ok);
        for path in [
            "/../admin",
            "/deployments/%2e%2e/%2e%2e/admin",
            "/a/%252e%252e/b",
            "/..;/admin",
            "/a\\..\\b",
        ] {
            let request = Request::get(path).body(()).unwrap();
            let error = service.clone().oneshot(request).await.unwrap_err();
            let refused = error.downcast_ref::<InvalidPath>().expect("an InvalidPath");
            assert_eq!(
                error.to_string(),
                format!("request path `{}` is not allowed", refused.path())
            );
        }
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn response_hop_by_hop_fields_and_the_hops_version_are_removed() {
        let (service, _) = service("http://localhost", || {
            Response::builder()
                .version(Version::HTTP_2)
                .header("connection", "keep-alive, x-hop")
                .header("x-hop", "dropped")
                .header("keep-alive", "timeout=5")
                .header("transfer-encoding", "chunked")
                .header("content-length", "5")
                .header("upgrade", "h2c")
                .header("x-ms-region", "Sweden Central")
                .body(())
                .unwrap()
        });
        let response = service
            .oneshot(Request::get("/x").body(()).unwrap())
            .await
            .unwrap();
        let mut expected = HeaderMap::new();
        expected.insert("x-ms-region", HeaderValue::from_static("Sweden Central"));
        assert_eq!(response.headers(), &expected);
        assert_eq!(response.version(), Version::HTTP_11);
    }

    #[tokio::test]
    async fn an_upgrade_passes_both_ways() {
        let (service, _) = service("http://localhost", || {
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "Upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
                .body(())
                .unwrap()
        });
        let request = Request::get("/realtime?deployment=d")
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("keep-alive", "timeout=5")
            .body(())
            .unwrap();
        let response = service.oneshot(request).await.unwrap();
        let mut expected = HeaderMap::new();
        expected.insert("connection", HeaderValue::from_static("upgrade"));
        expected.insert("upgrade", HeaderValue::from_static("websocket"));
        expected.insert(
            "sec-websocket-key",
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        assert_eq!(response.body().headers(), &expected);
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(response.headers()["connection"], "upgrade");
        assert_eq!(response.headers()["upgrade"], "websocket");
        assert_eq!(response.headers().len(), 3);
    }

    #[tokio::test]
    async fn upgrade_fields_go_from_a_response_that_is_not_a_101() {
        let (service, _) = service("http://localhost", || {
            Response::builder()
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .body(())
                .unwrap()
        });
        let request = Request::get("/realtime")
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        let response = service.oneshot(request).await.unwrap();
        assert!(response.headers().is_empty(), "{:?}", response.headers());
    }

    #[tokio::test]
    async fn a_response_head_over_64_kib_is_an_error() {
        fn fields(count: usize) -> Response<()> {
            let mut response = Response::new(());
            for i in 0..count {
                let value = HeaderValue::from_str(&"a".repeat(1000)).unwrap();
                response.headers_mut().insert(
                    http::HeaderName::try_from(format!("x-f{i:03}")).unwrap(),
                    value,
                );
            }
            response
        }
        // 60 fields of 1,010 bytes: under 64 KiB; 70: over.
        let (under, _) = service("http://localhost", || fields(60));
        let response = under
            .oneshot(Request::get("/x").body(()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.headers().len(), 60);
        let (over, _) = service("http://localhost", || fields(70));
        let error = over
            .oneshot(Request::get("/x").body(()).unwrap())
            .await
            .unwrap_err();
        assert!(error.is::<ResponseHeadTooLarge>(), "{error}");
        assert_eq!(
            error.to_string(),
            "the instance's response head is larger than 64 KiB"
        );
    }

    #[test]
    fn services_and_layers_are_send_sync_clone_and_debug() {
        fn assert_traits<T: Send + Sync + Clone + fmt::Debug + 'static>() {}
        assert_traits::<RebaseLayer>();
        assert_traits::<
            Rebase<tower::util::BoxCloneSyncService<Request<()>, Response<()>, BoxError>>,
        >();
        assert_traits::<InvalidPath>();
        assert_traits::<ResponseHeadTooLarge>();
    }
}
