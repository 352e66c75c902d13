//! [`Gateway`]: the standard stack, composed.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use aoai_auth::{AzureAuth, AzureAuthLayer};
use aoai_balance::{BackendError, BackendSpec, Balance, BalanceHealth, HealthPolicy, ServedBy};
use aoai_rebase::{InvalidBaseUrl, Rebase, RebaseLayer};
use aoai_retry::{ReplayBody, RetryNextBackendLayer, RetryNextBackendService};
use aoai_upstream::UpstreamClient;
use aoai_usage::{Caller, StripUsage, TokenLimiter, UsageBody};
use axum::body::Body;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use pin_project_lite::pin_project;
use tower::timeout::Timeout;
use tower::util::Either;
use tower::{Layer, Service};

use crate::BoxError;
use crate::classify::GatewayClassifier;
use crate::deployment::{DeploymentLayer, MapDeployment, SetDeployment};
use crate::error::{azure_error, error_response, error_response_with, find, message};
use crate::include_usage::{IncludeUsage, UsageAdded};
use crate::metrics::GatewayMetrics;
use crate::pinning::{ObjectMap, PinLayer, PinToObject, learns_id};
use crate::realtime::{Realtime, SessionMeter, Sessions};
use crate::record::RequestRecord;
use crate::upgrade;

/// The client a [`Gateway`] reaches the instances with unless given its own: hyper's, with
/// HTTP/2 by ALPN to `https` instances and the platform's trust roots
/// ([`UpstreamClient`]).
pub type DefaultClient = UpstreamClient<ReplayBody>;

/// One backend's own stack: optional auth, the attempt timeout (which starts when the request
/// is sent, not while it waits for a token), rebase onto its URL, the client.
type BackendStack<C> = MapDeployment<Either<AzureAuth<Attempt<C>>, Attempt<C>>>;
type Attempt<C> = Timeout<Rebase<C>>;
type Stack<C> = RetryNextBackendService<
    IncludeUsage<PinToObject<SetDeployment<Balance<BackendStack<C>, GatewayClassifier>>>>,
    GatewayClassifier,
>;
type StackFuture<B, C> = <Stack<C> as Service<Request<B>>>::Future;

/// The standard aoai-tower stack as one axum-ready service: mount it with
/// `Router::nest_service("/openai", gateway)`.
///
/// A request's path below the mount point is joined onto each backend's endpoint followed by
/// `/openai` (see [`GatewayBuilder::backend_path`]), so a caller's `/openai/deployments/...`
/// reaches `https://NAME.openai.azure.com/openai/deployments/...`.
///
/// - An HTTP/1.1 request without exactly one valid `Host` is answered 400 (hyper leaves this
///   check to the application), and no backend is contacted.
/// - The caller's `Authorization` and `api-key` headers, and an `api-key` query parameter, are
///   removed before any backend sees the request (and from a WebSocket handshake an
///   `openai-insecure-api-key.KEY` subprotocol), and so are its extensions (nothing inside
///   reads them).
/// - An upgrade (a WebSocket handshake, such as the Realtime API's) goes to one backend like any
///   request (without `Sec-WebSocket-Extensions`: see [`Sessions`]); when it answers
///   `101 Switching Protocols`, the two connections are joined. A WebSocket session's messages
///   (text, binary, ping, pong, close with its code and reason) are relayed both ways as they
///   come until both sides are closed, with no request deadline: only the idle limit and the
///   lifetime, if set ([`GatewayBuilder::session_idle_limit`],
///   [`GatewayBuilder::session_lifetime`]), and [`Sessions::close_all`] end one, with code 1001.
///   Another protocol's bytes are relayed until either side closes.
/// - Every response from a backend, and every error naming one, carries `x-served-by: NAME`
///   (unless turned off); every error of the stack becomes an Azure-shaped response
///   ([`error_response`](crate::error_response)).
/// - Each answer's token usage is read as it passes; when it ends (or the caller leaves), one
///   tracing event logs the caller's name, the backend, the deployment, the status, the tokens,
///   the latency and a stream's time to first token, and the metrics
///   ([`GatewayBuilder::metrics`]) and the caller's token limit
///   ([`GatewayBuilder::token_limiter`]) are charged.
///
/// `C` is the client that reaches the instances: [`DefaultClient`] unless the builder was given
/// another ([`GatewayBuilder::client`]). Cheap to clone: clones share the backends, their health
/// and the client's connections.
pub struct Gateway<C = DefaultClient> {
    stack: Stack<C>,
    health: BalanceHealth,
    served_by_values: Option<Arc<[HeaderValue]>>,
    /// Whether a backend has no `AzureAuth` (which removes the caller's credentials itself).
    unauthenticated_backend: bool,
    /// Where its Realtime sessions are counted, and their limits.
    realtime: Realtime,
    metrics: Option<GatewayMetrics>,
    limiter: Option<TokenLimiter>,
    objects: ObjectMap,
}

impl Gateway {
    /// Starts configuring a gateway that reaches its backends with the [`DefaultClient`].
    pub fn builder() -> GatewayBuilder {
        GatewayBuilder::new()
    }
}

impl<C> Gateway<C> {
    /// A live view of the backends' health, for an admin route.
    pub fn health(&self) -> &BalanceHealth {
        &self.health
    }

    /// Its Realtime (WebSocket) sessions: how many are open, and closing them at shutdown.
    pub fn sessions(&self) -> &Sessions {
        &self.realtime.sessions
    }
}

impl<C: Clone> Clone for Gateway<C> {
    fn clone(&self) -> Self {
        Self {
            stack: self.stack.clone(),
            health: self.health.clone(),
            served_by_values: self.served_by_values.clone(),
            unauthenticated_backend: self.unauthenticated_backend,
            realtime: self.realtime.clone(),
            metrics: self.metrics.clone(),
            limiter: self.limiter.clone(),
            objects: self.objects.clone(),
        }
    }
}

impl<C> fmt::Debug for Gateway<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gateway")
            .field("backends", &self.health.len())
            .field("served_by_header", &self.served_by_values.is_some())
            .finish_non_exhaustive()
    }
}

/// Serves any request body: axum's [`Body`], hyper's `Incoming` as it comes from a hyper
/// server, or any other `http_body::Body` of `Bytes`.
impl<B, C, RB> Service<Request<B>> for Gateway<C>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
    C: Service<Request<ReplayBody>, Response = Response<RB>> + Clone + Send + 'static,
    C::Error: Into<BoxError>,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError> + Send,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = GatewayFuture<B, C>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The stack is always ready: Balance picks per request and drives a clone of its choice
        // with `Oneshot`, and the retry layer's readiness is Balance's.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<B>) -> GatewayFuture<B, C> {
        let caller = request.extensions().get::<Caller>();
        let learns = learns_id(request.method(), request.uri().path());
        // A record (log line, metrics, the caller's token limit, the id of an object created)
        // only when something reads it.
        let log = RequestRecord::logging();
        let mut record =
            (self.metrics.is_some() || log || self.limiter.is_some() && caller.is_some() || learns)
                .then(|| {
                    RequestRecord::new(
                        request.method(),
                        request.uri().path(),
                        log,
                        caller.map(|caller| caller.shared_name().clone()),
                        self.metrics.clone(),
                    )
                });
        if learns && let Some(record) = &mut record {
            record.learn_into(self.objects.clone());
        }
        if !upgrade::has_valid_host(&request) {
            let response = azure_error(
                StatusCode::BAD_REQUEST,
                "invalid_host",
                "an HTTP/1.1 request needs exactly one valid Host header",
            );
            return GatewayFuture::refused(response, record);
        }
        if let (Some(limiter), Some(caller)) = (&self.limiter, caller) {
            match limiter.admit(caller, aoai_usage::estimate_request_tokens(&request)) {
                Ok(admission) => {
                    if let Some(record) = &mut record {
                        record.set_admission(admission);
                    }
                }
                Err(exceeded) => {
                    let response = error_response(&exceeded);
                    return GatewayFuture::refused(response, record);
                }
            }
        }
        // Taken before the extensions go: the caller's side of an upgrade, if it asks for one,
        // and who the session's responses are charged to.
        let upgrade = upgrade::is_requested(request.headers()).then(|| {
            let meter = SessionMeter::new(
                request.extensions().get::<Caller>().cloned(),
                self.limiter.clone(),
                self.metrics.clone(),
            );
            (hyper::upgrade::on(&mut request), meter)
        });
        let headers = request.headers_mut();
        // The caller's credentials are never forwarded: `AzureAuth` removes them for the
        // backends it authenticates, and the gateway for any other.
        if self.unauthenticated_backend {
            headers.remove(http::header::AUTHORIZATION);
            headers.remove("api-key");
        }
        if upgrade.is_some() {
            upgrade::prepare_request(headers);
        }
        // Browsers cannot set headers on a WebSocket handshake, so SDKs put the key in the query.
        if let Some(uri) = upgrade::without_api_key_in_query(request.uri()) {
            *request.uri_mut() = uri;
        }
        // Nothing inside reads the caller's extensions (the router's, for example); dropped
        // here, they are not cloned for every attempt.
        request.extensions_mut().clear();
        GatewayFuture {
            state: State::Forwarding {
                inner: self.stack.call(request),
            },
            served_by_values: self.served_by_values.clone(),
            record,
            upgrade: upgrade.map(|(caller, meter)| (caller, self.realtime.clone(), meter)),
        }
    }
}

const X_SERVED_BY: HeaderName = HeaderName::from_static("x-served-by");

pin_project! {
    /// Response future of [`Gateway`] for a request body of type `B`.
    pub struct GatewayFuture<B, C = DefaultClient>
    where
        Stack<C>: Service<Request<B>>,
    {
        #[pin]
        state: State<B, C>,
        served_by_values: Option<Arc<[HeaderValue]>>,
        record: Option<RequestRecord>,
        // The caller's side of an upgrade, where a WebSocket session is counted, and what
        // meters its responses' usage.
        upgrade: Option<(OnUpgrade, Realtime, SessionMeter)>,
    }
}

impl<B, C> GatewayFuture<B, C>
where
    Stack<C>: Service<Request<B>>,
{
    /// Answers `response` without contacting an instance.
    fn refused(response: Response<Body>, record: Option<RequestRecord>) -> Self {
        Self {
            state: State::Refused {
                response: Some(response),
            },
            served_by_values: None,
            record,
            upgrade: None,
        }
    }
}

pin_project! {
    #[project = StateProj]
    enum State<B, C>
    where
        Stack<C>: Service<Request<B>>,
    {
        Forwarding {
            #[pin]
            inner: StackFuture<B, C>,
        },
        Refused {
            response: Option<Response<Body>>,
        },
    }
}

impl<B, C> fmt::Debug for GatewayFuture<B, C>
where
    Stack<C>: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewayFuture")
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

impl<B, C, RB> Future for GatewayFuture<B, C>
where
    Stack<C>: Service<Request<B>, Response = Response<RB>, Error = BoxError>,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError> + Send,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = match this.state.project() {
            StateProj::Refused { response } => {
                let response = response
                    .take()
                    .expect("GatewayFuture polled after completion");
                return Poll::Ready(Ok(answer(response, this.record.take())));
            }
            StateProj::Forwarding { inner } => ready!(inner.poll(cx)),
        };
        let response = match response {
            Ok(mut response) => {
                if let Some((caller, realtime, meter)) = this.upgrade.take() {
                    upgrade::bridge_if_switched(caller, &mut response, &realtime, meter);
                }
                mark_served_by(&mut response, this.served_by_values.as_deref());
                answer(response, this.record.take())
            }
            Err(error) => {
                let served_by = find::<BackendError>(&*error).map(|e| e.served_by().clone());
                let message = message(&*error);
                let mut response = error_response_with(&*error, &message);
                let status = response.status();
                if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                    tracing::warn!(error = %message, status = status.as_u16(), "request failed");
                } else {
                    // The caller's own mistake (a body over the limit, an unknown deployment):
                    // the request's log line shows its status, and nothing needs an operator.
                    tracing::debug!(error = %message, status = status.as_u16(), "request refused");
                }
                if let Some(served_by) = served_by {
                    response.extensions_mut().insert(served_by);
                }
                mark_served_by(&mut response, this.served_by_values.as_deref());
                answer(response, this.record.take())
            }
        };
        Poll::Ready(Ok(response))
    }
}

/// `x-served-by: NAME` for the backend that answered, if any.
fn mark_served_by<B>(response: &mut Response<B>, values: Option<&[HeaderValue]>) {
    let index = response.extensions().get::<ServedBy>().map(ServedBy::index);
    if let (Some(values), Some(index)) = (values, index) {
        response
            .headers_mut()
            .insert(X_SERVED_BY, values[index].clone());
    }
}

/// The response the caller gets: its usage read on the way to `record` (if any), and what
/// the gateway added to a stream's answer ([`UsageAdded`]) removed again.
fn answer<RB>(response: Response<RB>, record: Option<RequestRecord>) -> Response<Body>
where
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError> + Send,
{
    let strip = response.extensions().get::<UsageAdded>().is_some()
        && aoai_usage::is_event_stream(response.headers());
    match record {
        None => boxed(response, strip),
        Some(record) => boxed(
            UsageBody::wrap(response, record, aoai_usage::DEFAULT_PARSE_LIMIT),
            strip,
        ),
    }
}

/// `response` with its body boxed, inside [`StripUsage`] when `strip`.
fn boxed<B>(response: Response<B>, strip: bool) -> Response<Body>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError> + Send,
{
    if strip {
        response.map(|body| Body::new(StripUsage::new(body)))
    } else {
        response.map(Body::new)
    }
}

/// Configures a [`Gateway`]; made by [`Gateway::builder`].
#[derive(Debug, Clone)]
pub struct GatewayBuilder<C = DefaultClient> {
    client: C,
    backends: Vec<Backend>,
    backend_path: String,
    max_attempts: usize,
    body_limit: usize,
    attempt_timeout: Duration,
    deadline: Duration,
    health: HealthPolicy,
    served_by_header: bool,
    include_usage: bool,
    realtime: Realtime,
    metrics: Option<GatewayMetrics>,
    limiter: Option<TokenLimiter>,
    objects: ObjectMap,
}

/// One instance of a [`Gateway`]: its name, its endpoint, and how it takes part (for
/// [`GatewayBuilder::add_backend`]).
///
/// ```
/// use aoai_tower::{Backend, Gateway};
///
/// // PTU first; pay-as-you-go in two regions, 3:1, when every PTU instance is cooling.
/// let gateway = Gateway::builder()
///     .add_backend(Backend::new("ptu", "https://ptu.openai.azure.com"))
///     .add_backend(Backend::new("eastus", "https://eastus.openai.azure.com").priority(2).weight(3))
///     .add_backend(Backend::new("westus", "https://westus.openai.azure.com").priority(2))
///     .build()?;
/// # Ok::<_, aoai_tower::GatewayError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Backend {
    name: String,
    endpoint: String,
    auth: Option<AzureAuthLayer>,
    priority: u32,
    weight: u32,
    /// The deployments it serves, the caller's name to its own; `None`: every one, as named.
    deployments: Option<HashMap<Arc<str>, Arc<str>>>,
}

impl Backend {
    /// The instance at `endpoint` (as the Azure portal shows it,
    /// `https://NAME.openai.azure.com`), named `name`, with no credential, priority 1 and
    /// weight 1.
    pub fn new(name: impl Into<String>, endpoint: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            endpoint: endpoint.into(),
            auth: None,
            priority: 1,
            weight: 1,
            deployments: None,
        }
    }

    /// Authenticates to it with `auth`. Clones of one [`AzureAuthLayer`] share its token
    /// cache.
    pub fn auth(mut self, auth: AzureAuthLayer) -> Self {
        self.auth = Some(auth);
        self
    }

    /// Its tier: 1 first (say, provisioned throughput); a request goes to tier 2 only while
    /// no tier-1 instance can take it, and so on. Default: 1.
    pub fn priority(mut self, priority: u32) -> Self {
        self.priority = priority;
        self
    }

    /// Its share of its tier's traffic, interleaved (smooth weighted round-robin). Default: 1.
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// The deployments it serves, each as `(the caller's name, its own name)`: a request for
    /// another deployment never goes there, and a request for one of these is renamed (in the
    /// path, a v1 body's `model`, or a Realtime handshake's query). Default: every deployment,
    /// under the caller's names.
    pub fn deployments<I, A, B>(mut self, deployments: I) -> Self
    where
        I: IntoIterator<Item = (A, B)>,
        A: Into<Arc<str>>,
        B: Into<Arc<str>>,
    {
        let names = deployments
            .into_iter()
            .map(|(asked, own)| (asked.into(), own.into()));
        self.deployments = Some(names.collect());
        self
    }
}

impl GatewayBuilder {
    fn new() -> Self {
        Self {
            client: UpstreamClient::new(),
            backends: Vec::new(),
            backend_path: "/openai".to_owned(),
            max_attempts: aoai_retry::DEFAULT_MAX_ATTEMPTS,
            body_limit: aoai_retry::DEFAULT_BODY_LIMIT,
            attempt_timeout: Duration::from_secs(300),
            deadline: Duration::from_secs(900),
            health: HealthPolicy::new(),
            served_by_header: true,
            include_usage: false,
            realtime: Realtime::default(),
            metrics: None,
            limiter: None,
            objects: ObjectMap::new(),
        }
    }
}

impl<C> GatewayBuilder<C> {
    /// Reaches the instances with `client` instead of the [`DefaultClient`]: any tower
    /// `Service` of `http::Request<ReplayBody>` with an absolute URI, such as an
    /// [`UpstreamClient`] built with a private CA
    /// ([`UpstreamClientBuilder::add_root_certificates_pem`](aoai_upstream::UpstreamClientBuilder::add_root_certificates_pem))
    /// or another connect timeout, or a client of your own wrapped in your own middleware.
    pub fn client<C2>(self, client: C2) -> GatewayBuilder<C2> {
        GatewayBuilder {
            client,
            backends: self.backends,
            backend_path: self.backend_path,
            max_attempts: self.max_attempts,
            body_limit: self.body_limit,
            attempt_timeout: self.attempt_timeout,
            deadline: self.deadline,
            health: self.health,
            served_by_header: self.served_by_header,
            include_usage: self.include_usage,
            realtime: self.realtime,
            metrics: self.metrics,
            limiter: self.limiter,
            objects: self.objects,
        }
    }

    /// Adds `backend`, with its own auth, priority and weight.
    pub fn add_backend(mut self, backend: Backend) -> Self {
        self.backends.push(backend);
        self
    }

    /// Adds a backend that needs no credential (an emulator, or one behind its own auth).
    /// `endpoint` is the instance's endpoint as the Azure portal shows it,
    /// `https://NAME.openai.azure.com`.
    pub fn backend(self, name: impl Into<String>, endpoint: impl Into<String>) -> Self {
        self.add_backend(Backend::new(name, endpoint))
    }

    /// Adds a backend authenticated by `auth`. Clones of one [`AzureAuthLayer`] share its
    /// token cache, so give every backend a clone of the same layer.
    pub fn backend_with_auth(
        self,
        name: impl Into<String>,
        endpoint: impl Into<String>,
        auth: AzureAuthLayer,
    ) -> Self {
        self.add_backend(Backend::new(name, endpoint).auth(auth))
    }

    /// The path joined onto each endpoint before the request's own path. Default: `/openai`,
    /// to mount the gateway with `nest_service("/openai", gateway)`.
    pub fn backend_path(mut self, path: impl Into<String>) -> Self {
        self.backend_path = path.into();
        self
    }

    /// Attempts per request, the first included. Default: 3.
    pub fn max_attempts(mut self, attempts: usize) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// The largest request body, in bytes. Default: 16 MiB.
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// How long one attempt may wait for the response headers (tower's
    /// [`Timeout`](tower::timeout::Timeout) on each backend, inside its auth: the wait for a
    /// token does not count). Default: 5 minutes (completions can take minutes before their
    /// first byte). The caller gets 504 when no attempt is left.
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = timeout;
        self
    }

    /// How long a request may take, reading its body and all attempts and backoffs included,
    /// to its response headers; past it, the caller gets 504. Default: 15 minutes. (Set with
    /// the attempt timeout, it arms a timer only for a request that could outlast it: see
    /// [`RetryNextBackendLayer::deadline`].)
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// The longest cooldown a 429 may cause. Default: 5 minutes.
    pub fn max_cooldown(mut self, cap: Duration) -> Self {
        self.health.max_cooldown = cap;
        self
    }

    /// The whole passive-health policy.
    pub fn health_policy(mut self, policy: HealthPolicy) -> Self {
        self.health = policy;
        self
    }

    /// Whether responses carry `x-served-by: NAME`. Default: on.
    pub fn served_by_header(mut self, on: bool) -> Self {
        self.served_by_header = on;
        self
    }

    /// Whether streamed chat completions are asked for their usage when the caller did not
    /// ([`IncludeUsageLayer`](crate::IncludeUsageLayer)), so every stream's tokens are counted; the caller still gets
    /// exactly the stream it asked for (the added usage chunk and `"usage":null` members are
    /// removed). Default: off.
    pub fn include_usage(mut self, on: bool) -> Self {
        self.include_usage = on;
        self
    }

    /// Closes a Realtime (WebSocket) session that has gone `limit` without a frame either way:
    /// both sides get code 1001 (going away) and the reason `idle for N s`. Default: none.
    pub fn session_idle_limit(mut self, limit: Duration) -> Self {
        self.realtime.idle_limit = Some(limit);
        self
    }

    /// Closes a Realtime (WebSocket) session `lifetime` after it started, busy or not: both
    /// sides get code 1001 and the reason `session lifetime of N s reached`. Default: none
    /// (Azure ends its Realtime sessions after 30 minutes itself).
    pub fn session_lifetime(mut self, lifetime: Duration) -> Self {
        self.realtime.lifetime = Some(lifetime);
        self
    }

    /// Counts the Realtime sessions in `sessions`, and lets [`Sessions::close_all`] close them:
    /// give each gateway a reload builds the handle of the first. Default: a handle of its own
    /// ([`Gateway::sessions`]).
    pub fn sessions(mut self, sessions: Sessions) -> Self {
        self.realtime.sessions = sessions;
        self
    }

    /// Records every request in `metrics` (see [`GatewayMetrics`] for what is recorded).
    pub fn metrics(mut self, metrics: GatewayMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Holds each request that carries a [`Caller`] extension (set by
    /// [`RequireClientKeyLayer`](crate::RequireClientKeyLayer) for named clients, or by your
    /// own auth) to its limits: over them, the caller gets 429 with `Retry-After` and no
    /// instance is contacted. Its tokens are charged when the answer ends.
    pub fn token_limiter(mut self, limiter: TokenLimiter) -> Self {
        self.limiter = Some(limiter);
        self
    }

    /// Where objects (stored responses, files, batches, threads, ...) were seen to live, shared
    /// with other gateways built with a clone (the one a reload builds). Default: a map of its
    /// own. A request naming an object goes to the instance that holds it: known from this map,
    /// or found by asking the instances in turn; see [`PinLayer`](crate::PinLayer).
    pub fn objects(mut self, objects: ObjectMap) -> Self {
        self.objects = objects;
        self
    }

    /// Builds the gateway.
    ///
    /// # Errors
    ///
    /// [`GatewayError`] when there is no backend, two share a name, a name is not a valid
    /// header value, or an endpoint is not a valid base URL.
    pub fn build(self) -> Result<Gateway<C>, GatewayError>
    where
        C: Clone,
    {
        if self.backends.is_empty() {
            return Err(GatewayError::NoBackends);
        }
        let classifier = GatewayClassifier::new(several_credentials(&self.backends));
        let mut names = HashSet::new();
        let mut stacks = Vec::with_capacity(self.backends.len());
        let unauthenticated_backend = self.backends.iter().any(|spec| spec.auth.is_none());
        let mut served_by_values = Vec::with_capacity(self.backends.len());
        for spec in self.backends {
            if !names.insert(spec.name.clone()) {
                return Err(GatewayError::DuplicateName(spec.name));
            }
            if spec.priority == 0 || spec.weight == 0 {
                return Err(GatewayError::ZeroPriorityOrWeight(spec.name));
            }
            let value = HeaderValue::from_str(&spec.name)
                .map_err(|_| GatewayError::InvalidName(spec.name.clone()))?;
            let base = format!(
                "{}{}",
                spec.endpoint.trim_end_matches('/'),
                self.backend_path
            );
            let rebase =
                RebaseLayer::new(&base).map_err(|source| GatewayError::InvalidEndpoint {
                    name: spec.name.clone(),
                    source,
                })?;
            let attempt = Timeout::new(rebase.layer(self.client.clone()), self.attempt_timeout);
            let service = match spec.auth {
                Some(auth) => Either::Left(auth.layer(attempt)),
                None => Either::Right(attempt),
            };
            let renames = spec
                .deployments
                .as_ref()
                .filter(|names| names.iter().any(|(asked, own)| asked != own))
                .map(|names| Arc::new(names.clone()));
            let mut backend = BackendSpec::new(spec.name, MapDeployment::new(service, renames))
                .priority(spec.priority)
                .weight(spec.weight);
            if let Some(names) = spec.deployments {
                backend = backend.deployments(names.into_keys());
            }
            stacks.push(backend);
            served_by_values.push(value);
        }
        let balance = Balance::with_backends(stacks, self.health, classifier);
        let health = balance.health();
        let balance = IncludeUsage::new(
            PinLayer::new(self.objects.clone()).layer(DeploymentLayer.layer(balance)),
            self.include_usage,
        );
        if let Some(metrics) = &self.metrics {
            metrics.watch(health.clone(), self.realtime.sessions.clone());
        }
        let retry = RetryNextBackendLayer::new(health.clone())
            .classifier(classifier)
            .max_attempts(self.max_attempts)
            .body_limit(self.body_limit)
            .deadline(self.deadline, Some(self.attempt_timeout))
            .layer(balance);
        Ok(Gateway {
            stack: retry,
            health,
            served_by_values: self.served_by_header.then(|| served_by_values.into()),
            unauthenticated_backend,
            realtime: self.realtime,
            metrics: self.metrics,
            limiter: self.limiter,
            objects: self.objects,
        })
    }
}

/// Whether the backends authenticate in more than one way: a token one of them cannot get,
/// another may not need.
fn several_credentials(backends: &[Backend]) -> bool {
    fn cache(spec: &Backend) -> Option<&aoai_auth::TokenCache> {
        spec.auth.as_ref().and_then(AzureAuthLayer::token_cache)
    }
    let Some(first) = backends.iter().find_map(cache) else {
        return false;
    };
    backends
        .iter()
        .any(|spec| !cache(spec).is_some_and(|other| other.is_shared_with(first)))
}

/// Why a [`GatewayBuilder`] could not build.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// No backend was configured.
    #[error("no backend is configured")]
    NoBackends,
    /// Two backends share a name.
    #[error("two backends are named {0:?}")]
    DuplicateName(String),
    /// A backend's priority or weight is 0 (both start at 1).
    #[error("backend {0:?}: priority and weight must be at least 1")]
    ZeroPriorityOrWeight(String),
    /// A name cannot be sent as a header value.
    #[error("backend name {0:?} is not a valid header value")]
    InvalidName(String),
    /// An endpoint is not a valid base URL.
    #[error("backend {name:?}: {source}")]
    InvalidEndpoint {
        /// The backend's name.
        name: String,
        /// What is wrong with its endpoint.
        #[source]
        source: InvalidBaseUrl,
    },
}
