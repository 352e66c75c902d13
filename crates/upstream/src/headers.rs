//! Hop-by-hop header removal (RFC 9110, section 7.6.1).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Hop-by-hop headers removed by name, besides `Connection`, the headers it lists, and `Proxy-*`.
const HOP_BY_HOP: [HeaderName; 5] = [
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes the headers that describe one connection rather than the message: `Connection` and
/// every header it names, `Keep-Alive`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`, and every
/// `Proxy-*` header (`Proxy-Authorization`, `Proxy-Authenticate`, `Proxy-Connection`, ...).
///
/// Allocates only when `Connection` names other headers or a `Proxy-*` header is present.
pub(crate) fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names settles the usual cases (none, or `Connection` alone) without
    // hashing every hop-by-hop name into the map.
    let (mut connection, mut others) = (false, false);
    for name in headers.keys() {
        if !may_be_hop_by_hop(name.as_str()) {
            continue;
        }
        if name == header::CONNECTION {
            connection = true;
        } else if HOP_BY_HOP.contains(name) || is_proxy_header(name) {
            others = true;
        }
    }
    if connection {
        remove_connection(headers);
    }
    if others {
        for name in &HOP_BY_HOP {
            headers.remove(name);
        }
        let proxy: Vec<HeaderName> = headers
            .keys()
            .filter(|n| is_proxy_header(n))
            .cloned()
            .collect();
        for name in &proxy {
            headers.remove(name);
        }
    }
}

/// Removes `Connection` and the headers it names.
fn remove_connection(headers: &mut HeaderMap) {
    let names_others = headers.get_all(header::CONNECTION).iter().any(|value| {
        connection_tokens(value)
            .any(|t| !t.eq_ignore_ascii_case("keep-alive") && !t.eq_ignore_ascii_case("close"))
    });
    if names_others {
        // Cloning a `HeaderValue` clones `Bytes`, not the data.
        let connection: Vec<HeaderValue> = headers
            .get_all(header::CONNECTION)
            .iter()
            .cloned()
            .collect();
        for name in connection.iter().flat_map(connection_tokens) {
            // Lookup by `&str` is case-insensitive; a token that is not a header name matches none.
            headers.remove(name);
        }
    }
    headers.remove(header::CONNECTION);
}

/// The tokens of a `Connection` value; none if it is not visible ASCII.
fn connection_tokens(value: &HeaderValue) -> impl Iterator<Item = &str> {
    value
        .to_str()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Whether a (lowercase) name has the length and first letter of a hop-by-hop header: a check
/// of two bytes that lets almost every end-to-end header (`content-type`, `user-agent`, ...) by.
fn may_be_hop_by_hop(name: &str) -> bool {
    match name.as_bytes() {
        // connection, keep-alive
        [b'c' | b'k', ..] if name.len() == 10 => true,
        // te, trailer, transfer-encoding
        [b't', ..] => matches!(name.len(), 2 | 7 | 17),
        // upgrade
        [b'u', ..] => name.len() == 7,
        // proxy-*
        [b'p', ..] => name.len() > 6,
        _ => false,
    }
}

fn is_proxy_header(name: &HeaderName) -> bool {
    // Header names are stored in lowercase.
    name.as_str().starts_with("proxy-")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_static(value));
        }
        headers
    }

    #[test]
    fn removes_hop_by_hop_and_connection_listed_headers() {
        let mut headers = map(&[
            ("connection", "X-Foo, keep-alive"),
            ("connection", " x-bar ,,"),
            ("x-foo", "1"),
            ("x-bar", "2"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic eA=="),
            ("proxy-authenticate", "Basic"),
            ("proxy-connection", "keep-alive"),
            ("proxy-anything", "1"),
            ("content-length", "3"),
            ("x-keep", "a"),
            ("x-keep", "b"),
        ]);
        remove_hop_by_hop(&mut headers);
        assert_eq!(
            headers,
            map(&[("content-length", "3"), ("x-keep", "a"), ("x-keep", "b")])
        );
    }

    #[test]
    fn leaves_end_to_end_headers_alone() {
        let original = map(&[
            ("content-type", "application/json"),
            ("authorization", "Bearer x"),
            ("x-proxy-note", "not a proxy header"),
        ]);
        let mut headers = original.clone();
        remove_hop_by_hop(&mut headers);
        assert_eq!(headers, original);
    }
}
