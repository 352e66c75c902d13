//! Hop-by-hop header fields (RFC 9110, section 7.6.1): meaningful to one connection only, so a
//! proxy removes them before forwarding a message either way.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// The options of the `Connection` fields: comma-separated tokens, trimmed.
fn connection_options(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|option| !option.is_empty())
}

/// Whether a message asks for (or, in a `101`, agrees to) a protocol upgrade: `Connection` has
/// the `upgrade` option and an `Upgrade` field is present.
pub(crate) fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && connection_options(headers).any(|option| option.eq_ignore_ascii_case(b"upgrade"))
}

/// Removes the hop-by-hop fields: `Connection` and every field it names, `Keep-Alive`, `TE`,
/// `Trailer`, `Transfer-Encoding`, `Upgrade` and every `Proxy-*` field. A message that had
/// `Transfer-Encoding` loses its `Content-Length` too: the coding framed it, not the length
/// (RFC 9112, section 6.3), and the next hop frames the body by what it really is.
///
/// With `keep_upgrade` (an upgrade request, or the `101` agreeing to it), `Upgrade` stays and
/// `Connection` becomes just `upgrade`, so the next hop switches protocols too.
pub(crate) fn remove_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    // Usually empty, and an empty `Vec` does not allocate.
    let named: Vec<HeaderName> = connection_options(headers)
        .filter_map(|option| HeaderName::from_bytes(option).ok())
        .filter(|name| !(keep_upgrade && name == header::UPGRADE))
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        KEEP_ALIVE,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
    ] {
        headers.remove(name);
    }
    let proxy: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for name in proxy {
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// The size `headers` take in an HTTP/1.1 head: each field's name and value with `: ` and CRLF,
/// and the empty line that ends the head.
pub(crate) fn head_size(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum::<usize>()
        + 2
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(fields: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for &(name, value) in fields {
            headers.append(name, HeaderValue::from_static(value));
        }
        headers
    }

    #[test]
    fn removes_hop_by_hop_fields_and_those_connection_names() {
        let mut headers = map(&[
            ("connection", "X-Foo, keep-alive"),
            ("connection", "x-bar,,"),
            ("x-foo", "dropped"),
            ("x-bar", "dropped"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic eDp5"),
            ("proxy-connection", "keep-alive"),
            ("content-type", "application/json"),
            ("authorization", "Bearer token"),
            ("x-proxy-note", "kept"),
            ("x-multi", "first"),
            ("x-multi", "second"),
        ]);
        remove_hop_by_hop(&mut headers, false);
        assert_eq!(
            headers,
            map(&[
                ("content-type", "application/json"),
                ("authorization", "Bearer token"),
                ("x-proxy-note", "kept"),
                ("x-multi", "first"),
                ("x-multi", "second"),
            ])
        );
    }

    #[test]
    fn transfer_encoding_takes_content_length_with_it() {
        let mut headers = map(&[
            ("transfer-encoding", "chunked"),
            ("content-length", "5"),
            ("content-type", "application/json"),
        ]);
        remove_hop_by_hop(&mut headers, false);
        assert_eq!(headers, map(&[("content-type", "application/json")]));

        let mut headers = map(&[("content-length", "5")]);
        remove_hop_by_hop(&mut headers, false);
        assert_eq!(headers, map(&[("content-length", "5")]));
    }

    #[test]
    fn an_upgrade_keeps_upgrade_and_connection_upgrade_only() {
        let mut headers = map(&[
            ("connection", "Upgrade, X-Foo"),
            ("upgrade", "websocket"),
            ("x-foo", "dropped"),
            ("keep-alive", "timeout=5"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]);
        assert!(is_upgrade(&headers));
        remove_hop_by_hop(&mut headers, true);
        assert_eq!(
            headers,
            map(&[
                ("upgrade", "websocket"),
                ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
                ("connection", "upgrade"),
            ])
        );
    }

    #[test]
    fn head_size_counts_fields_as_an_http1_head_has_them() {
        assert_eq!(head_size(&HeaderMap::new()), 2);
        let headers = map(&[("x-a", "1"), ("x-a", "22"), ("content-type", "text/plain")]);
        let wire = "x-a: 1\r\nx-a: 22\r\ncontent-type: text/plain\r\n\r\n";
        assert_eq!(head_size(&headers), wire.len());
    }

    #[test]
    fn an_upgrade_needs_both_the_option_and_the_field() {
        assert!(is_upgrade(&map(&[
            ("connection", "keep-alive"),
            ("connection", " UPGRADE "),
            ("upgrade", "websocket"),
        ])));
        assert!(!is_upgrade(&map(&[("upgrade", "websocket")])));
        assert!(!is_upgrade(&map(&[("connection", "upgrade")])));
        assert!(!is_upgrade(&map(&[
            ("connection", "upgraded"),
            ("upgrade", "websocket"),
        ])));
    }
}
