//! A tower [`Service`] that forwards HTTP requests to one backend base URL over a shared hyper client.
//!
//! [`Upstream`] is the innermost service of each backend in aoai-tower: it rewrites the request onto
//! the backend and sends it on an [`UpstreamClient`] (one keep-alive pool shared by all backends,
//! HTTP/1.1 or HTTP/2 by ALPN over rustls). The response body, an SSE stream above all, streams
//! back untouched, and so does the request body.
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
//!   once per `Upstream`. On HTTP/2 the backend's authority is also `:authority`; both carry the
//!   same value, as RFC 9113 requires.
//! - **Hop-by-hop headers** are removed from the request and from the response: `Connection` and
//!   every header it names, `Keep-Alive`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`, and
//!   every `Proxy-*` header. Every other header passes exactly as sent, `Content-Length` included.
//!   This runs after the middleware above, so a caller's `Connection: authorization` removes the
//!   credential that middleware set, and the backend answers 401.
//! - **Version**: set to HTTP/1.1, so hyper speaks HTTP/2 when ALPN negotiated it and HTTP/1.1
//!   otherwise, whatever version the caller used.
//!
//! A request path with a `.` or `..` segment (plain, percent-encoded up to three times, or with a
//! `;` parameter such as `..;`), an encoded slash or backslash, a backslash, a malformed escape,
//! or escapes that decode to bytes that are not UTF-8 is refused with
//! [`UpstreamError::InvalidPath`] before any backend is contacted, so a path can never climb out
//! of the base path. So is a request target that is not a path (`*`, authority form).
#![forbid(unsafe_code)]

mod client;
pub mod error;
pub mod future;
mod headers;
mod path;

use std::{
    fmt,
    net::IpAddr,
    sync::Arc,
    task::{Context, Poll},
};

use http::{
    HeaderValue, Request, Response, Uri, Version,
    header::HOST,
    uri::{Authority, Parts, PathAndQuery, Scheme},
};
use http_body::Body;
use hyper::body::Incoming;
use tower::Service;

use crate::headers::remove_hop_by_hop;
pub use crate::{
    client::{UpstreamClient, UpstreamClientBuilder},
    error::{InvalidBaseUrl, UpstreamError},
    future::ResponseFuture,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Forwards requests to one backend base URL; see the [crate docs](crate) for what is rewritten.
///
/// `B` is the request body type, shared with the [`UpstreamClient`]. It must be `Unpin` and
/// `Send + 'static` because hyper-util's pool may move the request to another task; its errors
/// become the caller's request error.
///
/// # Clone
///
/// Cloning is cheap (a reference count and a client clone) and shares the connection pool, so
/// middleware may clone an `Upstream` per request and drive the clone with `oneshot`.
pub struct Upstream<B: Send> {
    base: Arc<Base>,
    client: UpstreamClient<B>,
}

/// The parsed base URL, shared by clones.
struct Base {
    url: Uri,
    scheme: Scheme,
    authority: Authority,
    /// Base path without trailing slashes; empty for none.
    path: Box<str>,
    /// `Host` for every request, computed once.
    host: HeaderValue,
}

impl<B: Send> Upstream<B> {
    /// An `Upstream` sending to `base_url` over `client`.
    ///
    /// `base_url` is `https://host[:port][/base/path]`, or `http://` for a loopback host
    /// (`localhost`, `127.0.0.0/8`, `[::1]`) such as a local emulator. A trailing slash is
    /// ignored. It may not have a query string, a fragment, credentials, or dot segments in its
    /// path.
    ///
    /// # Errors
    ///
    /// [`InvalidBaseUrl`] naming what is wrong with `base_url`.
    pub fn new(base_url: &str, client: UpstreamClient<B>) -> Result<Self, InvalidBaseUrl> {
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
        let default_port = if *scheme == Scheme::HTTPS {
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
        Ok(Self {
            base: Arc::new(Base {
                scheme: scheme.clone(),
                authority: authority.clone(),
                path: base_path.into(),
                host,
                url,
            }),
            client,
        })
    }

    /// The base URL this `Upstream` sends to, as given to [`Upstream::new`].
    pub fn base_url(&self) -> &Uri {
        &self.base.url
    }

    /// The shared client this `Upstream` sends on.
    pub fn get_ref(&self) -> &UpstreamClient<B> {
        &self.client
    }

    /// The backend URI for a request URI, or `None` if its path is not allowed.
    fn target(&self, uri: &Uri) -> Option<Uri> {
        if !path::is_allowed(uri.path()) {
            return None;
        }
        // An allowed path starts with `/`, so the request has a path and query.
        let request = uri.path_and_query()?;
        let path_and_query = if self.base.path.is_empty() {
            request.clone()
        } else {
            let mut joined = String::with_capacity(self.base.path.len() + request.as_str().len());
            joined.push_str(&self.base.path);
            joined.push_str(request.as_str());
            PathAndQuery::try_from(joined).ok()?
        };
        let mut parts = Parts::default();
        parts.scheme = Some(self.base.scheme.clone());
        parts.authority = Some(self.base.authority.clone());
        parts.path_and_query = Some(path_and_query);
        Uri::from_parts(parts).ok()
    }
}

fn is_loopback(host: &str) -> bool {
    let ip = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.eq_ignore_ascii_case("localhost") || ip.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl<B> Service<Request<B>> for Upstream<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<Incoming>;
    type Error = UpstreamError;
    type Future = ResponseFuture;

    /// Always ready: hyper-util's client has no readiness of its own; it checks out or opens a
    /// pooled connection when the request is sent, inside the response future.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let Some(uri) = self.target(request.uri()) else {
            return ResponseFuture::refused(UpstreamError::InvalidPath {
                path: path::preview(request.uri().path()),
            });
        };
        *request.uri_mut() = uri;
        // hyper sends HTTP/1.1 requests as HTTP/2 on a connection that negotiated h2, but refuses
        // HTTP/2 requests on an HTTP/1.1 connection; ALPN decides, not the caller.
        *request.version_mut() = Version::HTTP_11;
        let headers = request.headers_mut();
        remove_hop_by_hop(headers);
        headers.insert(HOST, self.base.host.clone());
        ResponseFuture::sending(self.client.get_ref().request(request))
    }
}

impl<B: Send> Clone for Upstream<B> {
    fn clone(&self) -> Self {
        Self {
            base: Arc::clone(&self.base),
            client: self.client.clone(),
        }
    }
}

impl<B: Send> fmt::Debug for Upstream<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("base_url", &self.base.url)
            .field("client", &self.client)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http_body_util::Empty;

    use super::*;

    fn upstream(base_url: &str) -> Upstream<Empty<Bytes>> {
        Upstream::new(base_url, UpstreamClient::new()).unwrap()
    }

    fn target(base_url: &str, request: &str) -> Option<String> {
        upstream(base_url)
            .target(&request.parse().unwrap())
            .map(|uri| uri.to_string())
    }

    #[test]
    fn joins_the_request_onto_the_base() {
        let chat = "/deployments/d/chat/completions?api-version=2024-10-21";
        let expected = "https://x.openai.azure.com/openai/deployments/d/chat/completions?api-version=2024-10-21";
        assert_eq!(
            target("https://x.openai.azure.com/openai", chat).unwrap(),
            expected
        );
        assert_eq!(
            target("https://x.openai.azure.com/openai/", chat).unwrap(),
            expected
        );
        assert_eq!(
            target("https://x.openai.azure.com", &format!("/openai{chat}")).unwrap(),
            expected
        );
        assert_eq!(
            target(
                "https://x.openai.azure.com/",
                "http://caller:1/openai/models"
            )
            .unwrap(),
            "https://x.openai.azure.com/openai/models"
        );
        assert_eq!(target("https://x.openai.azure.com/openai", "/../x"), None);
        assert_eq!(target("https://x.openai.azure.com/openai", "*"), None);
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
