//! Errors returned by [`Upstream`](crate::Upstream).

/// Why [`Upstream`](crate::Upstream) could not forward a request.
///
/// The service returns this type as its error; the middleware stack above turns it into a
/// `BoxError`. To classify a failure from there, walk the [`source`](std::error::Error::source)
/// chain to [`hyper_util::client::legacy::Error`] and ask, for example,
/// [`is_connect`](hyper_util::client::legacy::Error::is_connect).
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
    /// Connecting to the backend, or exchanging the request and response head with it, failed.
    #[error("request to backend failed")]
    Request(#[source] hyper_util::client::legacy::Error),
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
}
