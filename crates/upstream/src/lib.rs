//! A tower [`Service`] that forwards HTTP requests to one backend base URL over a lean HTTP/1.1
//! keep-alive client.
//!
//! [`Upstream`] is the innermost service of each backend in aoai-tower: it rewrites the request onto
//! the backend and sends it over HTTP/1.1 (rustls for `https`), on a keep-alive connection from
//! its own per-thread pool. The task that polls the request does the I/O itself: no connection
//! task, no channel between them. The response body, an SSE stream above all, streams back
//! untouched as it is read ([`UpstreamBody`]), and so does the request body.
//!
//! Its [`server`] module is the other side of a proxy, built the same way: a lean HTTP/1.1
//! server connection that serves a tower service to callers (the gateway example's HTTP/1.1
//! callers).
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use aoai_upstream::{Upstream, UpstreamClient};
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # async fn run() -> Result<(), tower::BoxError> {
//! // One client for the whole program; every backend gets a clone.
//! let client = UpstreamClient::new();
//! let upstream = Upstream::new("https://my-instance.openai.azure.com/openai", client)?;
//! let service = ServiceBuilder::new()
//!     .timeout(Duration::from_secs(120))
//!     .service(upstream);
//!
//! let request = http::Request::post("/deployments/gpt-4o/chat/completions?api-version=2024-10-21")
//!     .header("content-type", "application/json")
//!     .body(Full::new(Bytes::from_static(br#"{"messages":[{"role":"user","content":"Hi"}]}"#)))?;
//! // Sent to https://my-instance.openai.azure.com/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21
//! let response = service.oneshot(request).await?;
//! println!("{}", response.status());
//! # Ok(())
//! # }
//! ```
//!
//! # What is rewritten
//!
//! - **URI**: scheme and authority become the backend's; the path becomes the base path followed
//!   by the request path, and the query is kept (`/openai` + `/deployments/d/chat/completions?x=1`
//!   gives `/openai/deployments/d/chat/completions?x=1`, with one slash at the joint). The
//!   caller's scheme and authority, if any, are ignored.
//! - **`Host`**: replaced by the backend's host (with its port when not the default), computed
//!   once per `Upstream`.
//! - **Hop-by-hop headers** are removed from the request and from the response: `Connection` and
//!   every header it names, `Keep-Alive`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`, and
//!   every `Proxy-*` header. Every other header passes exactly as sent. This runs after the
//!   middleware above, so a caller's `Connection: authorization` removes the credential that
//!   middleware set, and the backend answers 401.
//! - **Framing**: the request body is sent with `Content-Length` when its size is known (the
//!   caller's own `Content-Length` is replaced by the body's real length, so the two can never
//!   disagree on a kept-alive connection) and chunked otherwise; trailers are not forwarded.
//! - **Version**: always HTTP/1.1 to the backend, whatever version the caller used.
//!
//! # Connections
//!
//! A connection goes back to its pool once its response body has been read whole and the backend
//! did not ask to close it; a body dropped early closes it. A pooled connection is checked before
//! use (closed by the backend, or holding bytes nobody asked for: not used). If the backend closed
//! it just as the request went out, so that no byte of an answer came back, the request is sent
//! once more on a new connection, provided its body was a single frame (a buffered body, as
//! aoai-retry's, always is).
//!
//! A request path with a `.` or `..` segment (plain, percent-encoded up to three times, or with a
//! `;` parameter such as `..;`), an encoded slash or backslash, a backslash, a malformed escape,
//! or escapes that decode to bytes that are not UTF-8 is refused with
//! [`UpstreamError::InvalidPath`] before any backend is contacted, so a path can never climb out
//! of the base path. So is a request target that is not a path (`*`, authority form).
#![forbid(unsafe_code)]

mod body;
mod client;
mod conn;
pub mod error;
mod exchange;
pub mod future;
mod headers;
mod http1;
mod path;
mod pool;
pub mod server;

use std::{
    fmt,
    net::IpAddr,
    sync::Arc,
    task::{Context, Poll},
};

use http::{HeaderValue, Request, Response, Uri, uri::Scheme};
use http_body::Body;
use rustls::pki_types::ServerName;
use tower::Service;

pub use crate::{
    body::UpstreamBody,
    client::{UpstreamClient, UpstreamClientBuilder},
    error::{InvalidBaseUrl, InvalidRootCertificate, UpstreamError},
    future::ResponseFuture,
};
use crate::{
    conn::{ConnectSettings, Endpoint},
    pool::Pool,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Forwards requests to one backend base URL; see the [crate docs](crate) for what is rewritten.
///
/// Any request body type works; its errors become [`UpstreamError::RequestBody`].
///
/// # Clone
///
/// Cloning is cheap (a reference count) and shares the connection pool, so middleware may clone
/// an `Upstream` per request and drive the clone with `oneshot`.
#[derive(Clone)]
pub struct Upstream {
    base: Arc<Base>,
}

/// The parsed base URL and the backend's connections, shared by clones.
struct Base {
    url: Uri,
    /// Base path without trailing slashes; empty for none.
    path: Box<str>,
    /// `Host` for every request, computed once.
    host: HeaderValue,
    endpoint: Endpoint,
    settings: Arc<ConnectSettings>,
    pool: Arc<Pool>,
}

impl Upstream {
    /// An `Upstream` sending to `base_url` with `client`'s settings.
    ///
    /// `base_url` is `https://host[:port][/base/path]`, or `http://` for a loopback host
    /// (`localhost`, `127.0.0.0/8`, `[::1]`) such as a local emulator. A trailing slash is
    /// ignored. It may not have a query string, a fragment, credentials, or dot segments in its
    /// path.
    ///
    /// # Errors
    ///
    /// [`InvalidBaseUrl`] naming what is wrong with `base_url`.
    pub fn new(base_url: &str, client: UpstreamClient) -> Result<Self, InvalidBaseUrl> {
        if !base_url.contains("://") {
            return Err(InvalidBaseUrl::MissingScheme);
        }
        // `http::Uri` drops a fragment silently.
        if base_url.contains('#') {
            return Err(InvalidBaseUrl::Fragment);
        }
        let url: Uri = base_url.parse().map_err(InvalidBaseUrl::Unparsable)?;
        // `http::Uri` only has an authority alongside a scheme, so both are present or neither.
        let (Some(scheme), Some(authority)) = (url.scheme(), url.authority()) else {
            return Err(InvalidBaseUrl::MissingScheme);
        };
        if authority.as_str().contains('@') {
            return Err(InvalidBaseUrl::UserInfo);
        }
        let https = *scheme == Scheme::HTTPS;
        let default_port = if https {
            443
        } else if *scheme == Scheme::HTTP {
            if !is_loopback(authority.host()) {
                return Err(InvalidBaseUrl::InsecureScheme);
            }
            80
        } else {
            return Err(InvalidBaseUrl::UnsupportedScheme);
        };
        if url.query().is_some() {
            return Err(InvalidBaseUrl::Query);
        }
        let base_path = path::trim_base(url.path());
        if !base_path.is_empty() && !path::is_allowed(base_path) {
            return Err(InvalidBaseUrl::Path);
        }
        let host = match authority.port_u16() {
            Some(port) if port != default_port => authority.as_str(),
            _ => authority.host(),
        };
        let host = HeaderValue::from_str(host).expect("an authority is visible ASCII");
        let name = unbracketed(authority.host());
        let tls = if https {
            Some(ServerName::try_from(name.to_owned()).map_err(|_| InvalidBaseUrl::ServerName)?)
        } else {
            None
        };
        let endpoint = Endpoint {
            host: name.into(),
            port: authority.port_u16().unwrap_or(default_port),
            tls,
        };
        let settings = client.settings;
        Ok(Self {
            base: Arc::new(Base {
                path: base_path.into(),
                host,
                endpoint,
                pool: Arc::new(Pool::new(settings.idle_timeout)),
                settings,
                url,
            }),
        })
    }

    /// The base URL this `Upstream` sends to, as given to [`Upstream::new`].
    pub fn base_url(&self) -> &Uri {
        &self.base.url
    }
}

/// An IPv6 literal without its brackets; any other host unchanged.
fn unbracketed(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || unbracketed(host)
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl<B> Service<Request<B>> for Upstream
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<UpstreamBody>;
    type Error = UpstreamError;
    type Future = ResponseFuture;

    /// Always ready: a connection is taken from the pool, or opened, inside the response future.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // An allowed path starts with `/`, so the request has a path and query.
        if !path::is_allowed(request.uri().path()) || request.uri().path_and_query().is_none() {
            return ResponseFuture::refused(UpstreamError::InvalidPath {
                path: path::preview(request.uri().path()),
            });
        }
        ResponseFuture::sending(future::boxed(exchange::exchange(
            Arc::clone(&self.base),
            request,
        )))
    }
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("base_url", &self.base.url)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(base_url: &str) -> Upstream {
        Upstream::new(base_url, UpstreamClient::new()).unwrap()
    }

    #[test]
    fn endpoint_is_host_port_tls_and_base_path() {
        let azure = upstream("https://x.openai.azure.com/openai/");
        assert_eq!(&*azure.base.endpoint.host, "x.openai.azure.com");
        assert_eq!(azure.base.endpoint.port, 443);
        assert!(azure.base.endpoint.tls.is_some());
        assert_eq!(&*azure.base.path, "/openai");
        let local = upstream("http://[::1]:8080");
        assert_eq!(&*local.base.endpoint.host, "::1");
        assert_eq!(local.base.endpoint.port, 8080);
        assert!(local.base.endpoint.tls.is_none());
        assert_eq!(&*local.base.path, "");
    }

    #[test]
    fn host_carries_the_port_only_when_not_the_default() {
        let host = |url: &str| upstream(url).base.host.clone();
        assert_eq!(host("https://x.openai.azure.com"), "x.openai.azure.com");
        assert_eq!(
            host("https://x.openai.azure.com:443/openai"),
            "x.openai.azure.com"
        );
        assert_eq!(
            host("https://x.openai.azure.com:8443"),
            "x.openai.azure.com:8443"
        );
        assert_eq!(host("http://localhost:80"), "localhost");
        assert_eq!(host("http://[::1]:8080"), "[::1]:8080");
    }

    #[test]
    fn plain_http_only_for_loopback() {
        for host in ["localhost", "LOCALHOST", "127.0.0.1", "127.1.2.3", "[::1]"] {
            assert!(is_loopback(host), "{host}");
        }
        for host in ["example.com", "10.0.0.1", "[::2]", "localhost.example.com"] {
            assert!(!is_loopback(host), "{host}");
        }
    }
}
