//! The instance's base URL: checked once, then joined with each request's path.

use std::net::IpAddr;

use http::{
    Uri,
    uri::{Authority, PathAndQuery, Scheme},
};
use rustls_pki_types::ServerName;

use crate::{InvalidBaseUrl, InvalidPath, path};

/// A checked base URL, split into the parts every request gets.
#[derive(Debug)]
pub(crate) struct Base {
    /// As given, for [`RebaseLayer::base_url`](crate::RebaseLayer::base_url).
    pub(crate) url: Uri,
    scheme: Scheme,
    authority: Authority,
    /// The base path without trailing slashes; empty for none.
    path: Box<str>,
}

impl Base {
    pub(crate) fn parse(base_url: &str) -> Result<Self, InvalidBaseUrl> {
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
        if *scheme == Scheme::HTTPS {
            ServerName::try_from(unbracketed(authority.host()))
                .map_err(|_| InvalidBaseUrl::ServerName)?;
        } else if *scheme == Scheme::HTTP {
            if !is_loopback(authority.host()) {
                return Err(InvalidBaseUrl::InsecureScheme);
            }
        } else {
            return Err(InvalidBaseUrl::UnsupportedScheme);
        }
        if url.query().is_some() {
            return Err(InvalidBaseUrl::Query);
        }
        let path = path::trim_base(url.path());
        if !path.is_empty() && !path::is_allowed(path) {
            return Err(InvalidBaseUrl::Path);
        }
        Ok(Self {
            scheme: scheme.clone(),
            authority: authority.clone(),
            path: path.into(),
            url,
        })
    }

    /// `uri` moved onto this base: this scheme and authority, the base path followed by the
    /// request's path, and the request's query. The request's own scheme and authority, if any,
    /// are ignored.
    pub(crate) fn rebase(&self, uri: &Uri) -> Result<Uri, InvalidPath> {
        let refused = || InvalidPath::new(uri.path());
        // An allowed path starts with `/`, so the URI has a path and query.
        let Some(request) = uri
            .path_and_query()
            .filter(|_| path::is_allowed(uri.path()))
        else {
            return Err(refused());
        };
        let path_and_query = if self.path.is_empty() {
            request.clone()
        } else {
            PathAndQuery::try_from(format!("{}{}", self.path, request)).map_err(|_| refused())?
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|_| refused())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rebase(base_url: &str, request: &str) -> Result<String, InvalidPath> {
        let base = Base::parse(base_url).unwrap();
        base.rebase(&request.parse().unwrap())
            .map(|uri| uri.to_string())
    }

    #[test]
    fn joins_path_and_query_onto_the_base_with_one_slash() {
        let cases = [
            (
                "https://x.openai.azure.com/openai",
                "/deployments/d/chat/completions?api-version=2024-10-21",
                "https://x.openai.azure.com/openai/deployments/d/chat/completions?api-version=2024-10-21",
            ),
            (
                "https://x.openai.azure.com/openai/",
                "/deployments/d/embeddings",
                "https://x.openai.azure.com/openai/deployments/d/embeddings",
            ),
            (
                "https://x.openai.azure.com",
                "/openai/models?x=1",
                "https://x.openai.azure.com/openai/models?x=1",
            ),
            (
                "https://x.openai.azure.com/",
                "/openai/models",
                "https://x.openai.azure.com/openai/models",
            ),
            (
                "https://x.openai.azure.com/openai",
                "/",
                "https://x.openai.azure.com/openai/",
            ),
            (
                "http://127.0.0.1:8080/openai",
                "/a//b?q=%20",
                "http://127.0.0.1:8080/openai/a//b?q=%20",
            ),
            (
                "https://x.openai.azure.com:8443/openai",
                "http://caller.example:1/models?x=1",
                "https://x.openai.azure.com:8443/openai/models?x=1",
            ),
        ];
        for (base, request, expected) in cases {
            assert_eq!(
                rebase(base, request).unwrap(),
                expected,
                "{base} + {request}"
            );
        }
    }

    #[test]
    fn refuses_what_is_not_an_allowed_path() {
        for request in ["/a/../b", "/%2e%2e/admin", "*", "x.example:443"] {
            let error = rebase("https://x.openai.azure.com/openai", request).unwrap_err();
            assert!(error.to_string().contains("is not allowed"), "{request}");
        }
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

    fn kind(error: &InvalidBaseUrl) -> &'static str {
        match error {
            InvalidBaseUrl::Unparsable(_) => "Unparsable",
            InvalidBaseUrl::MissingScheme => "MissingScheme",
            InvalidBaseUrl::UnsupportedScheme => "UnsupportedScheme",
            InvalidBaseUrl::InsecureScheme => "InsecureScheme",
            InvalidBaseUrl::UserInfo => "UserInfo",
            InvalidBaseUrl::Query => "Query",
            InvalidBaseUrl::Fragment => "Fragment",
            InvalidBaseUrl::Path => "Path",
            InvalidBaseUrl::ServerName => "ServerName",
        }
    }

    #[test]
    fn invalid_base_urls_are_refused_with_clear_errors() {
        let cases = [
            ("x.openai.azure.com", "MissingScheme", "missing scheme"),
            (
                "x.openai.azure.com/openai",
                "MissingScheme",
                "missing scheme",
            ),
            (
                "ftp://x.openai.azure.com",
                "UnsupportedScheme",
                "unsupported scheme",
            ),
            (
                "http://x.openai.azure.com",
                "InsecureScheme",
                "only allowed for loopback",
            ),
            (
                "https://x.openai.azure.com/openai?api-version=1",
                "Query",
                "query string",
            ),
            (
                "https://x.openai.azure.com/openai#part",
                "Fragment",
                "fragment",
            ),
            (
                "https://x.openai.azure.com/open ai",
                "Unparsable",
                "not a valid URL",
            ),
            ("https://", "Unparsable", "not a valid URL"),
            (
                "https://user:secret@x.openai.azure.com",
                "UserInfo",
                "credentials",
            ),
            (
                "https://x.openai.azure.com/openai/../admin",
                "Path",
                "base path",
            ),
            ("https://x.openai.azure.com/%2e%2e", "Path", "base path"),
            ("https://x!y.example", "ServerName", "TLS server name"),
        ];
        for (url, expected, message) in cases {
            let error = Base::parse(url).unwrap_err();
            assert_eq!(kind(&error), expected, "{url}: {error:?}");
            let shown = error.to_string();
            assert!(shown.starts_with("invalid backend base URL: "), "{shown}");
            assert!(shown.contains(message), "{url}: {shown}");
            assert!(!shown.contains("secret"), "{shown}");
        }
    }

    #[test]
    fn valid_base_urls_are_accepted() {
        for url in [
            "https://x.openai.azure.com",
            "https://x.openai.azure.com/",
            "https://x.openai.azure.com/openai",
            "https://x.openai.azure.com:8443/some/base/",
            "https://10.1.2.3/openai",
            "https://[2001:db8::1]:8443",
            "http://127.0.0.1:1234",
            "http://localhost:8080/openai",
            "http://[::1]:8080",
        ] {
            let base = Base::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(
                base.url.to_string().trim_end_matches('/'),
                url.trim_end_matches('/')
            );
        }
        let base = Base::parse("HTTPS://X.openai.azure.com").unwrap();
        assert_eq!(base.url, "https://X.openai.azure.com/");
    }
}
