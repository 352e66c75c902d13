//! The hyper client that sends requests to Azure OpenAI instances: HTTP/2 by ALPN over rustls,
//! HTTP/1.1 keep-alive, and upgrades.
//!
//! [`UpstreamClient`] is hyper-util's pooled [`Client`] behind a rustls connector, as a tower
//! [`Service`]. It sends each request to the absolute URI it carries, so a layer above it says
//! where: aoai-rebase's `RebaseLayer` moves each request onto one instance's base URL and removes
//! the hop-by-hop header fields both ways.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use aoai_rebase::RebaseLayer;
//! use aoai_upstream::UpstreamClient;
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use tower::{BoxError, ServiceBuilder, ServiceExt};
//!
//! # async fn run() -> Result<(), BoxError> {
//! // One client for the whole program: every instance's stack gets a clone, and the clones share
//! // the connection pools.
//! let client = UpstreamClient::new();
//! let instance = ServiceBuilder::new()
//!     .timeout(Duration::from_secs(120))
//!     .layer(RebaseLayer::new("https://my-instance.openai.azure.com/openai")?)
//!     .service(client.clone());
//!
//! let request = http::Request::post("/deployments/gpt-4o/chat/completions?api-version=2024-10-21")
//!     .header("content-type", "application/json")
//!     .body(Full::new(Bytes::from_static(br#"{"messages":[{"role":"user","content":"Hi"}]}"#)))?;
//! // Sent to https://my-instance.openai.azure.com/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21
//! let response = instance.oneshot(request).await?;
//! println!("{} over {:?}", response.status(), response.version());
//! # Ok(())
//! # }
//! ```
//!
//! # Connections
//!
//! - **HTTP/2 by ALPN** to an `https` instance that offers it (Azure OpenAI does): every request
//!   to that instance is a stream on one TLS connection. The first requests to an instance may
//!   each start a connection; once one has agreed on HTTP/2, the others are dropped.
//! - **HTTP/1.1 keep-alive** otherwise (`http`, or an `https` server without HTTP/2): a connection
//!   goes back to the pool once its response body has been read whole.
//! - **Upgrades**: a request with the `upgrade` option in `Connection` and an `Upgrade` field goes
//!   over HTTP/1.1 (a connection that offers only `http/1.1` by ALPN), since HTTP/2 has no
//!   upgrades. On a `101 Switching Protocols` response, [`hyper::upgrade::on`] yields the
//!   connection.
//! - **TLS**: rustls with the `ring` provider and its safe default protocol versions. Trusted
//!   roots are the platform's (rustls-native-certs; Mozilla's from webpki-roots when the platform
//!   has none), plus the ones given to [`UpstreamClientBuilder::add_root_certificates_pem`].
//! - **Limits**: a response head that is still incomplete after 64 KiB (HTTP/1.1), or a header
//!   list over 64 KiB (HTTP/2), fails the request. An HTTP/1.1 head that arrives in one large
//!   read can pass hyper's check (up to about twice the size), so keep aoai-rebase's `Rebase`
//!   above, which refuses any response head over 64 KiB. Bound a whole attempt, TLS handshake
//!   included, with a timeout layer above.
//!
//! The request's HTTP version is that of the caller's hop, so it is not used: the client picks
//! the version to the instance as above.
//!
//! # Errors
//!
//! Failures are hyper-util's [`Error`]: [`Error::is_connect`] tells that no connection could be
//! made (name resolution, TCP connect refused or timed out, TLS handshake failed), so the
//! instance never saw the request; the source chain holds the [`hyper::Error`] or
//! [`std::io::Error`] behind it.
#![forbid(unsafe_code)]

mod builder;
mod error;

use std::{
    fmt,
    task::{Context, Poll},
};

use http::{HeaderMap, Request, Response, Version, header};
use http_body::Body;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{Client, Error, ResponseFuture, connect::HttpConnector};
use tower::{BoxError, Service};

pub use crate::{builder::UpstreamClientBuilder, error::InvalidRootCertificate};

/// Sends requests, each to the absolute URI it carries, over pooled connections; see the
/// [crate docs](crate).
///
/// `B` is the request body type. Build one with [`UpstreamClient::new`] or
/// [`UpstreamClient::builder`].
///
/// # Clone
///
/// Cloning is cheap (reference counts) and the clones share the connection pools, so every
/// instance's stack, and every request, may use its own clone.
pub struct UpstreamClient<B> {
    /// Offers `h2` and `http/1.1` by ALPN.
    alpn: Client<HttpsConnector<HttpConnector>, B>,
    /// Offers only `http/1.1`: for upgrade requests.
    http1: Client<HttpsConnector<HttpConnector>, B>,
}

impl UpstreamClient<()> {
    /// A builder to configure timeouts and trusted roots.
    ///
    /// ```no_run
    /// use std::time::Duration;
    ///
    /// use aoai_upstream::UpstreamClient;
    /// use http_body_util::Full;
    /// use bytes::Bytes;
    ///
    /// # fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = UpstreamClient::builder()
    ///     .connect_timeout(Duration::from_secs(5))
    ///     .add_root_certificates_pem(&std::fs::read("internal-ca.pem")?)?
    ///     .build::<Full<Bytes>>();
    /// # drop(client);
    /// # Ok(())
    /// # }
    /// ```
    pub fn builder() -> UpstreamClientBuilder {
        UpstreamClientBuilder::default()
    }
}

impl<B> UpstreamClient<B>
where
    B: Body + Send,
    B::Data: Send,
{
    /// A client with the default settings of [`UpstreamClientBuilder`]. It reads the platform's
    /// trust store: make one and clone it.
    pub fn new() -> Self {
        UpstreamClientBuilder::default().build()
    }
}

impl<B> Default for UpstreamClient<B>
where
    B: Body + Send,
    B::Data: Send,
{
    fn default() -> Self {
        Self::new()
    }
}

impl<B> Clone for UpstreamClient<B> {
    fn clone(&self) -> Self {
        Self {
            alpn: self.alpn.clone(),
            http1: self.http1.clone(),
        }
    }
}

impl<B> fmt::Debug for UpstreamClient<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamClient").finish_non_exhaustive()
    }
}

impl<B> Service<Request<B>> for UpstreamClient<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<Incoming>;
    type Error = Error;
    type Future = ResponseFuture;

    /// Always ready: a connection is taken from the pool, or made, inside the response future.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<B>) -> ResponseFuture {
        // hyper-util refuses an HTTP/2 request on an HTTP/1.1 connection; the version to the
        // instance is the connection's.
        *request.version_mut() = Version::HTTP_11;
        if is_upgrade(request.headers()) {
            self.http1.request(request)
        } else {
            self.alpn.request(request)
        }
    }
}

/// Whether a request asks for an upgrade: `Connection` has the `upgrade` option and an `Upgrade`
/// field is present.
fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|value| value.as_bytes().split(|&b| b == b','))
            .any(|option| option.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
}
