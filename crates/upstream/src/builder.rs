//! [`UpstreamClientBuilder`]: timeouts and trusted roots.

use std::{sync::Arc, time::Duration};

use http_body::Body;
use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, pem::PemObject},
};

use crate::{
    UpstreamClient,
    error::{InvalidRootCertificate, Kind},
};

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// The response head size at which hyper gives up on a response.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Configures an [`UpstreamClient`]; made by [`UpstreamClient::builder`].
#[derive(Debug, Clone)]
pub struct UpstreamClientBuilder {
    connect_timeout: Duration,
    pool_idle_timeout: Duration,
    /// Roots added besides the platform's.
    added_roots: RootCertStore,
}

impl Default for UpstreamClientBuilder {
    fn default() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            pool_idle_timeout: DEFAULT_POOL_IDLE_TIMEOUT,
            added_roots: RootCertStore::empty(),
        }
    }
}

impl UpstreamClientBuilder {
    /// How long to wait for a TCP connection to an instance (default 10 s). The TLS handshake is
    /// not included: bound a whole attempt with a timeout layer above the client.
    pub const fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long an idle pooled connection is kept (default 90 s).
    pub const fn pool_idle_timeout(mut self, timeout: Duration) -> Self {
        self.pool_idle_timeout = timeout;
        self
    }

    /// Trusts the certificates in `pem` (one or more `-----BEGIN CERTIFICATE-----` blocks) as
    /// roots for `https` instances, besides the platform's: for an instance behind a private
    /// certificate authority (an API Management gateway with an internal certificate), or a
    /// TLS-inspecting proxy. Other PEM blocks, such as keys, are skipped.
    ///
    /// # Errors
    ///
    /// [`InvalidRootCertificate`] when `pem` has no certificate, is malformed, or holds a
    /// certificate that cannot be a root; nothing is added then.
    pub fn add_root_certificates_pem(mut self, pem: &[u8]) -> Result<Self, InvalidRootCertificate> {
        let mut added = RootCertStore::empty();
        for certificate in CertificateDer::pem_slice_iter(pem) {
            added
                .add(certificate.map_err(Kind::Pem)?)
                .map_err(Kind::Certificate)?;
        }
        if added.is_empty() {
            return Err(Kind::Empty.into());
        }
        self.added_roots.roots.extend(added.roots);
        Ok(self)
    }

    /// Builds the client for request bodies of type `B`. It reads the platform's trust store:
    /// build once and clone the client.
    pub fn build<B>(&self) -> UpstreamClient<B>
    where
        B: Body + Send,
        B::Data: Send,
    {
        let tls = self.tls_config();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(self.connect_timeout));
        let alpn = HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http.clone());
        let http1 = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let mut client = Client::builder(TokioExecutor::new());
        client
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(self.pool_idle_timeout)
            // hyper fails an HTTP/1.1 head still incomplete once this much is buffered. A head
            // that arrives in one large read can get past it (hyperium/hyper#4081, up to about
            // twice the size), so aoai-rebase's `Rebase` checks the head it gets as well.
            .http1_max_buf_size(MAX_RESPONSE_HEAD)
            .http2_max_header_list_size(MAX_RESPONSE_HEAD as u32);
        UpstreamClient {
            alpn: client.build(alpn),
            http1: client.build(http1),
        }
    }

    /// The TLS configuration the client's `https` connections use: the platform's roots (or
    /// webpki's, when the platform has none) and those added. For other clients of the app
    /// that must trust the same roots, such as an OTLP exporter. It reads the platform's trust
    /// store.
    pub fn tls_config(&self) -> ClientConfig {
        let mut roots = RootCertStore::empty();
        // A platform certificate rustls cannot parse, or a store that cannot be read, is skipped.
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        if roots.is_empty() {
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        roots.roots.extend(self.added_roots.roots.iter().cloned());
        // An explicit provider: `ClientConfig::builder()` needs exactly one process-wide default,
        // and other crates in a program may enable aws-lc-rs as well.
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports rustls' default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth()
    }
}
