//! Errors returned by [`Upstream`](crate::Upstream) and its response body.

use std::io;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why [`Upstream`](crate::Upstream) could not forward a request, or why its response body
/// ended early.
///
/// The service returns this type as its error; the middleware stack above turns it into a
/// `BoxError`. To classify a failure from there, walk the [`source`](std::error::Error::source)
/// chain to an `UpstreamError` and ask, for example, [`is_connect`](Self::is_connect).
///
/// No variant carries request or response headers, so no credential can reach a message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// The request path could climb out of the backend's base path (a `.` or `..` segment, plain
    /// or percent-encoded, an encoded slash, a backslash) or is not in origin form. The backend
    /// was not contacted.
    #[error("request path `{path}` is not allowed")]
    InvalidPath {
        /// The start of the refused path, at most 64 bytes, followed by `...` when cut.
        path: String,
    },
    /// No connection to the backend could be made: name resolution, TCP connect (refused or
    /// timed out), or the TLS handshake failed. The request was not sent.
    #[error("cannot connect to backend")]
    Connect(#[source] io::Error),
    /// The request was (perhaps partly) sent, but writing it or reading the response head
    /// failed: the connection broke, the backend closed it without answering, or it answered
    /// something that is not an HTTP/1.1 response.
    #[error("request to backend failed")]
    Request(#[source] io::Error),
    /// The caller's request body failed while it was being sent.
    #[error("reading the request body failed")]
    RequestBody(#[source] BoxError),
    /// The response body broke off: the connection failed or closed before the body was
    /// complete, or its chunked framing was invalid.
    #[error("backend response body failed")]
    Body(#[source] io::Error),
}

impl UpstreamError {
    /// Whether no connection could be made, so the backend never saw the request.
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Connect(_))
    }
}

/// A backend base URL that [`Upstream::new`](crate::Upstream::new) refuses.
///
/// The message names the problem but never repeats the URL, which could carry credentials.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidBaseUrl {
    /// The text is not a URI.
    #[error("invalid backend base URL: not a valid URL")]
    Unparsable(#[source] http::uri::InvalidUri),
    /// No `http://` or `https://` prefix.
    #[error("invalid backend base URL: missing scheme, expected `https://` or `http://`")]
    MissingScheme,
    /// A scheme other than `http` or `https`.
    #[error("invalid backend base URL: unsupported scheme, expected `https` or `http`")]
    UnsupportedScheme,
    /// Plain `http` to a host that is not loopback.
    #[error(
        "invalid backend base URL: plain `http` is only allowed for loopback hosts, use `https`"
    )]
    InsecureScheme,
    /// Credentials (`user:password@`) in the authority.
    #[error("invalid backend base URL: credentials in the URL are not supported")]
    UserInfo,
    /// A query string (`?...`).
    #[error("invalid backend base URL: a query string is not allowed")]
    Query,
    /// A fragment (`#...`).
    #[error("invalid backend base URL: a fragment is not allowed")]
    Fragment,
    /// A base path with dot segments, encoded slashes or backslashes.
    #[error("invalid backend base URL: the base path is not allowed")]
    Path,
    /// A host name that TLS cannot verify (not a DNS name or an IP address).
    #[error("invalid backend base URL: the host is not a valid TLS server name")]
    ServerName,
}

/// A certificate that [`UpstreamClientBuilder::add_root_certificate`](crate::UpstreamClientBuilder::add_root_certificate)
/// cannot trust as a root: not DER, or not an X.509 certificate.
#[derive(Debug, thiserror::Error)]
#[error("invalid root certificate")]
pub struct InvalidRootCertificate(#[source] pub(crate) rustls::Error);
