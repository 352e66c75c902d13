//! The failures [`RebaseLayer::new`](crate::RebaseLayer::new) and [`Rebase`](crate::Rebase) add.

/// A request path that [`Rebase`](crate::Rebase) refuses to forward, because it could climb out
/// of the instance's base path (a `.` or `..` segment, plain or percent-encoded, an encoded slash,
/// a backslash) or is not a path at all (`*`, an authority). The inner service was not called.
///
/// It carries a short preview of the path, never the request's headers.
#[derive(Debug, Clone, thiserror::Error)]
#[error("request path `{path}` is not allowed")]
pub struct InvalidPath {
    path: String,
}

impl InvalidPath {
    pub(crate) fn new(path: &str) -> Self {
        Self {
            path: crate::path::preview(path),
        }
    }

    /// The start of the refused path, at most 64 bytes, followed by `...` when cut.
    pub fn path(&self) -> &str {
        &self.path
    }
}

/// A response whose head is larger than [`MAX_RESPONSE_HEAD`](crate::MAX_RESPONSE_HEAD): the
/// instance's answer was dropped unread.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the instance's response head is larger than 64 KiB")]
pub struct ResponseHeadTooLarge {
    _private: (),
}

impl ResponseHeadTooLarge {
    pub(crate) const fn new() -> Self {
        Self { _private: () }
    }
}

/// A base URL that [`RebaseLayer::new`](crate::RebaseLayer::new) refuses.
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
