//! [`RequireClientKeyLayer`]: refuse callers without a configured client key.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use aoai_usage::Caller;
use axum::body::Body;
use http::{Request, Response, StatusCode, header};
use pin_project_lite::pin_project;
use subtle::{Choice, ConditionallySelectable, ConstantTimeEq};
use tower::{Layer, Service};

use crate::error::azure_error;
use crate::upgrade;

/// Refuses callers that do not present one of the configured client keys, as `api-key: KEY` or
/// `Authorization: Bearer KEY` (what the OpenAI and Azure SDKs send), with a 401 in Azure's
/// error shape. Keys are compared in constant time; they never appear in `Debug` output.
///
/// An upgrade request (a WebSocket handshake: `Connection: upgrade` and an `Upgrade` field) may
/// present its key otherwise, because a browser cannot set headers on a WebSocket handshake: as
/// an `api-key` query parameter (`?api-key=KEY`, percent-encoded), as Azure takes it, or as an
/// offered subprotocol `openai-insecure-api-key.KEY`, as OpenAI's browser clients send it. No
/// other request may: a key in a URL is written wherever URLs are (proxies' and load balancers'
/// access logs, browser history), so callers that can send a header should. The
/// [`Gateway`](crate::Gateway) removes both before any instance sees the handshake.
///
/// A key may be unnamed ([`new`](Self::new)) or belong to a named client
/// ([`with_clients`](Self::with_clients), [`client`](Self::client)): a request that presents a
/// client's key gets that client's [`Caller`] as a request extension, for the layers below
/// (the gateway's token limiter, `GatewayBuilder::token_limiter`, its log line and metrics) to
/// name the caller and hold it to its [`CallerLimits`](aoai_usage::CallerLimits). A request
/// that presents an unnamed key gets no `Caller`.
///
/// The presented key is compared with every configured key, named or not, without stopping at
/// a match. If several entries hold the same key, the one added last decides whether (and
/// which) `Caller` the request gets.
///
/// The caller's key is left on the request; the [`Gateway`](crate::Gateway) removes the
/// caller's credentials before any backend sees the request.
///
/// ```
/// use aoai_tower::RequireClientKeyLayer;
/// use aoai_usage::{Caller, CallerLimits};
///
/// let layer = RequireClientKeyLayer::new(["an-unnamed-key"])
///     .client(Caller::new("search-team"), "a-key-of-search-team")
///     .client(
///         Caller::new("batch").with_limits(CallerLimits {
///             tokens_per_minute: Some(50_000),
///             requests_per_minute: None,
///         }),
///         "a-key-of-batch",
///     );
/// assert_eq!(layer.len(), 3);
/// let debug = format!("{layer:?}");
/// assert!(debug.contains("search-team") && !debug.contains("a-key-of"), "{debug}");
/// ```
#[derive(Clone)]
pub struct RequireClientKeyLayer {
    keys: Arc<[ClientKey]>,
}

/// One accepted key, and the client it names, if any. (No `Debug`: it holds the key.)
#[derive(Clone)]
struct ClientKey {
    key: Box<[u8]>,
    caller: Option<Caller>,
}

impl ClientKey {
    /// `key` trimmed; `None` when that leaves nothing.
    fn new(key: &str, caller: Option<Caller>) -> Option<Self> {
        let key = key.trim();
        (!key.is_empty()).then(|| Self {
            key: key.as_bytes().into(),
            caller,
        })
    }
}

impl RequireClientKeyLayer {
    /// Accepts any of `keys`, unnamed (a request presenting one gets no [`Caller`]); empty keys
    /// are ignored, so an empty list refuses everyone. Add named clients with
    /// [`client`](Self::client) or [`clients`](Self::clients).
    pub fn new<I, K>(keys: I) -> Self
    where
        I: IntoIterator<Item = K>,
        K: AsRef<str>,
    {
        Self {
            keys: keys
                .into_iter()
                .filter_map(|key| ClientKey::new(key.as_ref(), None))
                .collect(),
        }
    }

    /// Accepts the keys of `clients`, `(caller, key)` pairs: a request presenting a client's
    /// key gets its [`Caller`] as a request extension. Empty keys are ignored, so an empty list
    /// refuses everyone.
    pub fn with_clients<I, K>(clients: I) -> Self
    where
        I: IntoIterator<Item = (Caller, K)>,
        K: AsRef<str>,
    {
        Self::new(std::iter::empty::<&str>()).clients(clients)
    }

    /// Also accepts `key`, as the client `caller`: a request presenting it gets `caller` as a
    /// request extension. An empty key is ignored.
    #[must_use]
    pub fn client(self, caller: Caller, key: impl AsRef<str>) -> Self {
        self.clients([(caller, key)])
    }

    /// Also accepts the keys of `clients`, `(caller, key)` pairs (see
    /// [`client`](Self::client)).
    #[must_use]
    pub fn clients<I, K>(self, clients: I) -> Self
    where
        I: IntoIterator<Item = (Caller, K)>,
        K: AsRef<str>,
    {
        let mut keys = self.keys.to_vec();
        keys.extend(
            clients
                .into_iter()
                .filter_map(|(caller, key)| ClientKey::new(key.as_ref(), Some(caller))),
        );
        Self { keys: keys.into() }
    }

    /// How many keys are accepted, named or not.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is accepted (everyone is refused).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The named clients, in the order they were added.
    pub fn callers(&self) -> impl Iterator<Item = &Caller> {
        self.keys.iter().filter_map(|key| key.caller.as_ref())
    }

    /// Whether the request presents an accepted key: `None` if not, else the [`Caller`] the
    /// key names, if any.
    fn check<B>(&self, request: &Request<B>) -> Option<Option<&Caller>> {
        let presented = presented_key(request)?;
        let presented = presented.as_ref();
        // Compare against every key, without stopping at a match; which one matched is
        // selected without a branch, and looked up once all were compared.
        let mut matched = Choice::from(0);
        let mut index = 0u64;
        for (i, key) in self.keys.iter().enumerate() {
            let equal = key.key.ct_eq(presented);
            matched |= equal;
            index = u64::conditional_select(&index, &(i as u64), equal);
        }
        bool::from(matched).then(|| {
            usize::try_from(index)
                .ok()
                .and_then(|i| self.keys.get(i))
                .and_then(|key| key.caller.as_ref())
        })
    }
}

/// The key a request presents: its `api-key` header, else its `Authorization: Bearer` token,
/// else, for an upgrade request only, its `api-key` query parameter (the name in any letter
/// case, as the gateway removes it), else its `openai-insecure-api-key.KEY` subprotocol.
fn presented_key<B>(request: &Request<B>) -> Option<Cow<'_, [u8]>> {
    let headers = request.headers();
    if let Some(key) = headers.get("api-key") {
        return Some(Cow::Borrowed(key.as_bytes()));
    }
    if let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "))
    {
        return Some(Cow::Borrowed(token));
    }
    if !upgrade::is_requested(headers) {
        return None;
    }
    let in_query = request.uri().query().and_then(|query| {
        form_urlencoded::parse(query.as_bytes())
            .find(|(name, _)| name.eq_ignore_ascii_case("api-key"))
            .map(|(_, key)| match key {
                Cow::Borrowed(key) => Cow::Borrowed(key.as_bytes()),
                Cow::Owned(key) => Cow::Owned(key.into_bytes()),
            })
    });
    in_query.or_else(|| upgrade::subprotocol_key(headers).map(Cow::Borrowed))
}

impl fmt::Debug for RequireClientKeyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names only: a key never appears.
        let names: Vec<&str> = self.callers().map(Caller::name).collect();
        f.debug_struct("RequireClientKeyLayer")
            .field("keys", &format_args!("[{} redacted]", self.keys.len()))
            .field("clients", &names)
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

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if let Some(caller) = self.keys.check(&request) {
            if let Some(caller) = caller {
                let caller = caller.clone();
                request.extensions_mut().insert(caller);
            }
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

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use aoai_usage::CallerLimits;
    use tower::{ServiceExt, service_fn};

    use super::*;

    /// Sends a request presenting `header: value` (if any) through `layer` to a service that
    /// hands the request's `Caller` back in the response's extensions; the status and the
    /// caller the inner service saw (`None` when it was not called, or saw none).
    async fn send(
        layer: &RequireClientKeyLayer,
        header: Option<(&str, &str)>,
    ) -> (StatusCode, Option<Caller>) {
        let mut request = Request::new(());
        if let Some((name, value)) = header {
            request.headers_mut().insert(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        send_request(layer, request).await
    }

    /// [`send`] with a request of the test's own.
    async fn send_request(
        layer: &RequireClientKeyLayer,
        request: Request<()>,
    ) -> (StatusCode, Option<Caller>) {
        let inner = service_fn(|request: Request<()>| async move {
            let mut response = Response::new(Body::empty());
            if let Some(caller) = request.extensions().get::<Caller>() {
                response.extensions_mut().insert(caller.clone());
            }
            Ok::<_, Infallible>(response)
        });
        let response = layer.layer(inner).oneshot(request).await.unwrap();
        (
            response.status(),
            response.extensions().get::<Caller>().cloned(),
        )
    }

    /// A request to `uri`, a WebSocket handshake if `upgrade`, offering `protocols` if given.
    fn handshake(uri: &str, upgrade: bool, protocols: Option<&str>) -> Request<()> {
        let mut request = Request::builder().uri(uri);
        if upgrade {
            request = request
                .header(header::CONNECTION, "Upgrade")
                .header(header::UPGRADE, "websocket");
        }
        if let Some(protocols) = protocols {
            request = request.header(header::SEC_WEBSOCKET_PROTOCOL, protocols);
        }
        request.body(()).unwrap()
    }

    fn limited(name: &str, tokens: u64) -> Caller {
        Caller::new(name).with_limits(CallerLimits {
            tokens_per_minute: Some(tokens),
            requests_per_minute: None,
        })
    }

    #[tokio::test]
    async fn a_named_clients_key_names_the_caller_and_an_unnamed_key_names_none() {
        let layer = RequireClientKeyLayer::new(["unnamed-1", " ", "unnamed-2"])
            .client(limited("search", 50_000), "search-key")
            .clients([
                (Caller::new("batch"), "batch-key"),
                (Caller::new("empty"), ""),
            ]);
        assert_eq!(layer.len(), 4, "empty keys are ignored");
        assert_eq!(
            layer.callers().map(Caller::name).collect::<Vec<_>>(),
            ["search", "batch"]
        );

        let (status, caller) = send(&layer, Some(("api-key", "search-key"))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(caller, Some(limited("search", 50_000)));
        let (status, caller) = send(&layer, Some(("authorization", "Bearer batch-key"))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(caller.as_ref().map(Caller::name), Some("batch"));
        for unnamed in ["unnamed-1", "unnamed-2"] {
            assert_eq!(
                send(&layer, Some(("api-key", unnamed))).await,
                (StatusCode::OK, None),
                "{unnamed}"
            );
        }
        for refused in [
            None,
            Some(("api-key", "")),
            Some(("api-key", "search-ke")),
            Some(("api-key", "search-key2")),
            Some(("authorization", "batch-key")),
        ] {
            assert_eq!(
                send(&layer, refused).await,
                (StatusCode::UNAUTHORIZED, None),
                "{refused:?}"
            );
        }
    }

    #[tokio::test]
    async fn with_clients_accepts_only_the_clients_keys() {
        let layer = RequireClientKeyLayer::with_clients([
            (Caller::new("a"), "key-a".to_owned()),
            (Caller::new("b"), " key-b ".to_owned()),
            (Caller::new("c"), "key-c".to_owned()),
        ]);
        for (key, name) in [("key-a", "a"), ("key-b", "b"), ("key-c", "c")] {
            let (status, caller) = send(&layer, Some(("api-key", key))).await;
            assert_eq!(status, StatusCode::OK, "{key}");
            assert_eq!(caller.as_ref().map(Caller::name), Some(name), "{key}");
        }
        assert_eq!(
            send(&layer, Some(("api-key", "key-d"))).await,
            (StatusCode::UNAUTHORIZED, None)
        );
        let none = RequireClientKeyLayer::with_clients(Vec::<(Caller, &str)>::new());
        assert!(none.is_empty());
        assert_eq!(
            send(&none, Some(("api-key", "key-a"))).await.0,
            StatusCode::UNAUTHORIZED
        );
    }

    #[tokio::test]
    async fn of_entries_sharing_a_key_the_last_added_decides() {
        let layer = RequireClientKeyLayer::new(["shared"]).client(Caller::new("named"), "shared");
        let (_, caller) = send(&layer, Some(("api-key", "shared"))).await;
        assert_eq!(caller.as_ref().map(Caller::name), Some("named"));
        let layer = RequireClientKeyLayer::with_clients([
            (Caller::new("first"), "shared"),
            (Caller::new("second"), "shared"),
        ]);
        let (_, caller) = send(&layer, Some(("api-key", "shared"))).await;
        assert_eq!(caller.as_ref().map(Caller::name), Some("second"));
    }

    #[tokio::test]
    async fn a_key_in_the_query_is_taken_from_an_upgrade_request_only() {
        let layer = RequireClientKeyLayer::new(["unnamed"]).client(Caller::new("web"), "web-key");
        let status = |uri: &str, upgrade: bool| {
            let request = handshake(uri, upgrade, None);
            let layer = &layer;
            async move {
                let (status, caller) = send_request(layer, request).await;
                (status, caller.map(|c| c.name().to_owned()))
            }
        };
        let realtime = "/openai/realtime?api-version=2025-04-01-preview&deployment=rt";
        assert_eq!(
            status(&format!("{realtime}&api-key=web-key"), true).await,
            (StatusCode::OK, Some("web".to_owned()))
        );
        assert_eq!(
            status("/x?API-Key=unnamed&deployment=rt", true).await,
            (StatusCode::OK, None)
        );
        // Percent-encoded, as `URLSearchParams` writes it.
        let layer_with_plus = RequireClientKeyLayer::new(["a+b/c="]);
        let request = Request::builder()
            .uri("/x?api-key=a%2Bb%2Fc%3D")
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "websocket")
            .body(())
            .unwrap();
        let inner = service_fn(|_: Request<()>| async {
            Ok::<_, Infallible>(Response::new(Body::empty()))
        });
        let response = layer_with_plus.layer(inner).oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        for refused in [
            format!("{realtime}&api-key=web-ke"),
            format!("{realtime}&api-keys=web-key"),
            realtime.to_owned(),
        ] {
            assert_eq!(
                status(&refused, true).await.0,
                StatusCode::UNAUTHORIZED,
                "{refused}"
            );
        }
        // Not an upgrade: a key in the URL is not taken.
        assert_eq!(
            status(&format!("{realtime}&api-key=web-key"), false).await,
            (StatusCode::UNAUTHORIZED, None)
        );
    }

    /// OpenAI's browser clients offer the key as a subprotocol: taken from a handshake only, and
    /// only from a subprotocol named for it.
    #[tokio::test]
    async fn a_key_in_the_insecure_api_key_subprotocol_is_taken_from_an_upgrade_request_only() {
        let layer = RequireClientKeyLayer::new(["unnamed"]).client(Caller::new("web"), "web-key");
        let realtime = "/openai/v1/realtime?model=gpt-realtime";
        let with = |upgrade: bool, protocols: &str| handshake(realtime, upgrade, Some(protocols));
        let (status, caller) = send_request(
            &layer,
            with(true, "realtime, openai-insecure-api-key.web-key"),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(caller.as_ref().map(Caller::name), Some("web"));
        let (status, caller) =
            send_request(&layer, with(true, "openai-insecure-api-key.unnamed")).await;
        assert_eq!((status, caller), (StatusCode::OK, None));
        for refused in [
            with(true, "realtime, openai-insecure-api-key.web-ke"),
            with(true, "realtime, web-key"),
            with(true, "realtime"),
            with(false, "realtime, openai-insecure-api-key.web-key"),
        ] {
            assert_eq!(
                send_request(&layer, refused).await.0,
                StatusCode::UNAUTHORIZED
            );
        }
    }

    #[test]
    fn debug_shows_the_clients_names_never_a_key() {
        let layer = RequireClientKeyLayer::new(["unnamed-secret"])
            .client(limited("search-team", 1), "named-secret-1")
            .clients([(Caller::new("batch"), "named-secret-2")]);
        let debug = format!("{layer:?}");
        assert!(!debug.contains("secret"), "{debug}");
        assert!(
            debug.contains("search-team") && debug.contains("batch"),
            "{debug}"
        );
        assert!(debug.contains("3 redacted"), "{debug}");
        let service = layer.layer(());
        let debug = format!("{service:?}");
        assert!(!debug.contains("secret"), "{debug}");
    }
}
