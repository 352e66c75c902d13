//! [`UpstreamClient`]: connection settings shared by every backend.

use std::{fmt, sync::Arc, time::Duration};

use rustls::{RootCertStore, pki_types::CertificateDer};

use crate::{conn::ConnectSettings, error::InvalidRootCertificate};

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// How [`Upstream`](crate::Upstream)s connect: a connect timeout, how long idle keep-alive
/// connections are kept, and TLS (rustls with ring, Mozilla's roots from `webpki-roots` plus any
/// given to [`UpstreamClientBuilder::add_root_certificate`], ALPN `http/1.1`).
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

    /// A builder for a client with non-default timeouts or extra root certificates.
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
#[derive(Clone)]
pub struct UpstreamClientBuilder {
    connect_timeout: Duration,
    pool_idle_timeout: Duration,
    /// Mozilla's roots and any added.
    roots: RootCertStore,
}

impl fmt::Debug for UpstreamClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamClientBuilder")
            .field("connect_timeout", &self.connect_timeout)
            .field("pool_idle_timeout", &self.pool_idle_timeout)
            .field("root_certificates", &self.roots.len())
            .finish()
    }
}

impl UpstreamClientBuilder {
    fn new() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            pool_idle_timeout: DEFAULT_POOL_IDLE_TIMEOUT,
            roots: RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            },
        }
    }

    /// How long to wait for the TCP connection to a backend (default 10 s), per address, and
    /// then again for the TLS handshake. Bound a whole attempt with a timeout layer above
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

    /// Trusts `der`, a DER-encoded X.509 certificate, as a root for `https` backends, in addition
    /// to Mozilla's roots (which stay trusted). For a backend behind a private certificate
    /// authority, such as an API Management gateway with an internal certificate, pass that
    /// authority's certificate; a self-signed server certificate (not a CA certificate) works
    /// too. Call it once per certificate.
    ///
    /// # Errors
    ///
    /// [`InvalidRootCertificate`](crate::InvalidRootCertificate) when `der` is not a
    /// certificate rustls can use as a root (not DER, not X.509); nothing is added.
    ///
    /// ```no_run
    /// use aoai_upstream::{Upstream, UpstreamClient};
    /// use rustls::pki_types::CertificateDer;
    ///
    /// # fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// // The private CA's certificate, DER-encoded (convert a PEM file with
    /// // `openssl x509 -in ca.pem -outform der -out ca.der`).
    /// let ca = CertificateDer::from(std::fs::read("internal-ca.der")?);
    /// let client = UpstreamClient::builder().add_root_certificate(ca)?.build();
    /// let upstream = Upstream::new("https://apim.internal.example/openai", client)?;
    /// # drop(upstream);
    /// # Ok(())
    /// # }
    /// ```
    pub fn add_root_certificate(
        mut self,
        der: CertificateDer<'static>,
    ) -> Result<Self, InvalidRootCertificate> {
        self.roots.add(der).map_err(InvalidRootCertificate)?;
        Ok(self)
    }

    /// Builds the client.
    pub fn build(self) -> UpstreamClient {
        // An explicit provider: `ClientConfig::builder()` would need exactly one process-wide
        // default, and other crates in a program may enable aws-lc-rs as well.
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports rustls' default protocol versions")
        .with_root_certificates(self.roots)
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
