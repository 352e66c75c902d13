//! [`UpstreamClient`]: connection settings shared by every backend.

use std::{fmt, sync::Arc, time::Duration};

use crate::conn::ConnectSettings;

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// How [`Upstream`](crate::Upstream)s connect: a connect timeout, how long idle keep-alive
/// connections are kept, and TLS (rustls with ring, Mozilla's roots from `webpki-roots`,
/// ALPN `http/1.1`).
///
/// Each `Upstream` keeps its own pool of idle HTTP/1.1 connections to its backend, one list per
/// thread: a request takes a connection from its own thread's list and returns it there, so
/// under a runtime per core (the gateway example's) no request touches another thread. The
/// connection is read and written by the task that polls the request and its response body, with
/// no connection task in between.
///
/// # Clone
///
/// Cloning is cheap and shares the settings (the TLS configuration above all): build one client
/// and clone it into every backend.
#[derive(Clone)]
pub struct UpstreamClient {
    pub(crate) settings: Arc<ConnectSettings>,
}

impl UpstreamClient {
    /// A client with the default settings: 10 s connect timeout, 90 s pool idle timeout.
    ///
    /// Building needs no runtime; sending requests needs a Tokio runtime.
    pub fn new() -> Self {
        UpstreamClientBuilder::new().build()
    }

    /// A builder for a client with non-default timeouts.
    ///
    /// ```
    /// use std::time::Duration;
    /// use aoai_upstream::UpstreamClient;
    ///
    /// let client = UpstreamClient::builder()
    ///     .connect_timeout(Duration::from_secs(3))
    ///     .pool_idle_timeout(Duration::from_secs(30))
    ///     .build();
    /// # drop(client);
    /// ```
    pub fn builder() -> UpstreamClientBuilder {
        UpstreamClientBuilder::new()
    }
}

impl Default for UpstreamClient {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamClient")
            .field("connect_timeout", &self.settings.connect_timeout)
            .field("pool_idle_timeout", &self.settings.idle_timeout)
            .finish_non_exhaustive()
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

    /// How long to wait for the TCP connection to a backend (default 10 s), per address. The TLS
    /// handshake is not included; bound a whole attempt with a timeout layer above
    /// [`Upstream`](crate::Upstream).
    pub const fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long an idle pooled connection is kept (default 90 s). Also used as the TCP
    /// keep-alive time.
    pub const fn pool_idle_timeout(mut self, timeout: Duration) -> Self {
        self.pool_idle_timeout = timeout;
        self
    }

    /// Builds the client.
    pub fn build(self) -> UpstreamClient {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        // An explicit provider: `ClientConfig::builder()` would need exactly one process-wide
        // default, and other crates in a program may enable aws-lc-rs as well.
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports rustls' default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        UpstreamClient {
            settings: Arc::new(ConnectSettings {
                connect_timeout: self.connect_timeout,
                idle_timeout: self.pool_idle_timeout,
                tls: Arc::new(tls),
            }),
        }
    }
}
