//! The shared hyper client.

use std::{fmt, sync::Arc, time::Duration};

use http_body::Body;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use thread_local::ThreadLocal;

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The connector under [`UpstreamClient`]: TCP (`TCP_NODELAY`, connect timeout), then rustls for
/// `https` with ALPN `h2` and `http/1.1`.
type Connector = HttpsConnector<HttpConnector>;

/// One HTTP client shared by every [`Upstream`](crate::Upstream): keep-alive connection pools,
/// HTTP/1.1 and HTTP/2 chosen by ALPN over rustls (ring, Mozilla roots from `webpki-roots`), plain
/// HTTP/1.1 for loopback backends, `TCP_NODELAY`, and a connect timeout.
///
/// # One pool per thread
///
/// Each thread that sends gets its own connection pool, made on its first request. A hyper
/// connection is driven by a task of its own, spawned where the connection was opened; with one
/// pool per thread, a request and its connection's task stay on one thread, so under a runtime
/// per core (the gateway example's) no request wakes another thread. Under a multi-thread
/// runtime it costs at most one pool per worker thread.
///
/// `B` is the request body type. It is sent as it streams, so no boxing is needed; use one body
/// type per client, for example `http_body_util::Full<Bytes>` or
/// `http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>`.
///
/// # Clone
///
/// Cloning is cheap and shares the pool: build one client and clone it into every backend.
pub struct UpstreamClient<B: Send> {
    shared: Arc<Shared<B>>,
}

/// What every clone shares: how to make a pool, and each thread's pool.
struct Shared<B: Send> {
    connector: Connector,
    pool_idle_timeout: Duration,
    pools: ThreadLocal<Client<Connector, B>>,
}

impl UpstreamClient<()> {
    /// A builder for a client with non-default timeouts.
    ///
    /// ```
    /// use std::time::Duration;
    /// use aoai_upstream::UpstreamClient;
    /// use http_body_util::Full;
    /// use bytes::Bytes;
    ///
    /// let client: UpstreamClient<Full<Bytes>> = UpstreamClient::builder()
    ///     .connect_timeout(Duration::from_secs(3))
    ///     .pool_idle_timeout(Duration::from_secs(30))
    ///     .build();
    /// # drop(client);
    /// ```
    pub fn builder() -> UpstreamClientBuilder {
        UpstreamClientBuilder::new()
    }
}

impl<B> UpstreamClient<B>
where
    B: Body + Send,
    B::Data: Send,
{
    /// A client with the default settings: 10 s connect timeout, 90 s pool idle timeout.
    ///
    /// Building needs no runtime; sending requests needs a Tokio runtime.
    pub fn new() -> Self {
        UpstreamClientBuilder::new().build()
    }
}

impl<B> UpstreamClient<B>
where
    B: Body + Send,
    B::Data: Send,
{
    /// The calling thread's hyper-util client (its own pool), made on first use.
    pub fn get_ref(&self) -> &Client<Connector, B> {
        let shared = &*self.shared;
        shared.pools.get_or(|| {
            Client::builder(TokioExecutor::new())
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(shared.pool_idle_timeout)
                .build(shared.connector.clone())
        })
    }
}

impl<B: Send> Default for UpstreamClient<B>
where
    B: Body + Send,
    B::Data: Send,
{
    fn default() -> Self {
        Self::new()
    }
}

impl<B: Send> Clone for UpstreamClient<B> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<B: Send> fmt::Debug for UpstreamClient<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamClient").finish_non_exhaustive()
    }
}

/// Configures an [`UpstreamClient`]; made by [`UpstreamClient::builder`].
#[derive(Debug, Clone)]
pub struct UpstreamClientBuilder {
    connect_timeout: Duration,
    pool_idle_timeout: Duration,
}

impl UpstreamClientBuilder {
    const fn new() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            pool_idle_timeout: DEFAULT_POOL_IDLE_TIMEOUT,
        }
    }

    /// How long to wait for the TCP connection to a backend (default 10 s). The TLS handshake is
    /// not included; bound a whole attempt with a timeout layer above
    /// [`Upstream`](crate::Upstream).
    pub const fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long an idle pooled connection is kept open (default 90 s). Also used as the TCP
    /// keep-alive interval, as hyper-util does for its own HTTP connector.
    pub const fn pool_idle_timeout(mut self, timeout: Duration) -> Self {
        self.pool_idle_timeout = timeout;
        self
    }

    /// Builds the client for request body type `B`.
    pub fn build<B>(self) -> UpstreamClient<B>
    where
        B: Body + Send,
        B::Data: Send,
    {
        let mut http = HttpConnector::new();
        // The https connector below decides between TLS and plain TCP by scheme.
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(self.connect_timeout));
        http.set_keepalive(Some(self.pool_idle_timeout));

        // An explicit provider: `ClientConfig::builder()` would need exactly one process-wide
        // default, and other crates in a program may enable aws-lc-rs as well.
        let https = HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(Arc::new(rustls::crypto::ring::default_provider()))
            .expect("the ring provider supports rustls' default protocol versions")
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);

        UpstreamClient {
            shared: Arc::new(Shared {
                connector: https,
                pool_idle_timeout: self.pool_idle_timeout,
                pools: ThreadLocal::new(),
            }),
        }
    }
}
