//! What hyper leaves to the application: the `Host` check, the caller's key in a query (which
//! WebSocket clients use) removed, and joining the two sides of an upgrade (a WebSocket
//! handshake answered `101 Switching Protocols`): message by message for a WebSocket
//! ([`crate::realtime`]), byte by byte for any other protocol.

use http::header::{CONNECTION, HOST, SEC_WEBSOCKET_EXTENSIONS, SEC_WEBSOCKET_PROTOCOL, UPGRADE};
use http::uri::Authority;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::realtime::{Realtime, SessionMeter};

/// Whether `request` has the `Host` RFC 9112 requires of HTTP/1.1: exactly one, an authority
/// (`host[:port]`, no user info). Other versions carry theirs elsewhere (HTTP/2's
/// `:authority`) or need none (HTTP/1.0).
pub(crate) fn has_valid_host<B>(request: &Request<B>) -> bool {
    if request.version() != Version::HTTP_11 {
        return true;
    }
    let mut hosts = request.headers().get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(host), None) => host
            .to_str()
            .ok()
            .and_then(|host| host.parse::<Authority>().ok())
            .is_some_and(|authority| !authority.as_str().contains('@')),
        _ => false,
    }
}

/// The URI without its `api-key` query parameters (in any letter case, percent-encoded or
/// not), the caller's credential; `None` when it has none.
pub(crate) fn without_api_key_in_query(uri: &Uri) -> Option<Uri> {
    let query = uri.query()?;
    let is_key = |pair: &str| {
        let name = pair.split('=').next().unwrap_or_default();
        form_urlencoded::parse(name.as_bytes())
            .next()
            .is_some_and(|(name, _)| name.eq_ignore_ascii_case("api-key"))
    };
    if !query.split('&').any(is_key) {
        return None;
    }
    let kept: Vec<&str> = query.split('&').filter(|pair| !is_key(pair)).collect();
    let path_and_query = match kept.is_empty() {
        true => uri.path().to_owned(),
        false => format!("{}?{}", uri.path(), kept.join("&")),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().ok()?);
    Uri::from_parts(parts).ok()
}

/// Whether the request asks to switch protocols: `Connection` names `upgrade` and an `Upgrade`
/// field says to what.
pub(crate) fn is_requested(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE)
        && headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// The subprotocol in which OpenAI's browser clients send the caller's key
/// (`openai-insecure-api-key.KEY`), as a browser cannot set headers on a handshake.
const KEY_SUBPROTOCOL: &str = "openai-insecure-api-key.";

/// The caller's key in an `openai-insecure-api-key.KEY` subprotocol the handshake offers, if any.
pub(crate) fn subprotocol_key(headers: &HeaderMap) -> Option<&[u8]> {
    headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .find_map(|token| token.trim_ascii().strip_prefix(KEY_SUBPROTOCOL.as_bytes()))
}

/// Readies an upgrade request for the instance:
///
/// - No `Sec-WebSocket-Extensions`. The relay reads and writes each message (it must, to close
///   a session with a code of its own), and tungstenite reads no extension: were the caller and
///   the instance to agree on one (`permessage-deflate`, which browsers offer), their frames
///   would be compressed with it and the relay could not read them. Without the offer, the
///   session is uncompressed end to end.
/// - No `openai-insecure-api-key.KEY` among the offered subprotocols (`Sec-WebSocket-Protocol`):
///   that is the caller's key, which no instance may see; the others (`realtime`) stay, and the
///   instance picks among them.
pub(crate) fn prepare_request(headers: &mut HeaderMap) {
    headers.remove(SEC_WEBSOCKET_EXTENSIONS);
    if subprotocol_key(headers).is_none() {
        return;
    }
    let kept: Vec<&str> = headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|token| !token.is_empty() && !token.starts_with(KEY_SUBPROTOCOL))
        .collect();
    let kept = HeaderValue::from_str(&kept.join(", ")).ok();
    headers.remove(SEC_WEBSOCKET_PROTOCOL);
    if let Some(kept) = kept.filter(|value| !value.is_empty()) {
        headers.insert(SEC_WEBSOCKET_PROTOCOL, kept);
    }
}

/// Whether a `101` switched to WebSocket (its `Upgrade` field says `websocket`).
fn is_websocket(headers: &HeaderMap) -> bool {
    headers
        .get(UPGRADE)
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"websocket"))
}

/// When the backend switched protocols, joins its connection to the caller's once both are
/// handed over, in a task of its own: a WebSocket is relayed message by message (counted in
/// `realtime`'s sessions, with its limits); another protocol byte by byte until either side
/// closes.
pub(crate) fn bridge_if_switched<B>(
    caller: OnUpgrade,
    response: &mut Response<B>,
    realtime: &Realtime,
    mut meter: SessionMeter,
) {
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return;
    }
    let backend = hyper::upgrade::on(&mut *response);
    if is_websocket(response.headers()) {
        meter.switched(response);
        realtime.relay(caller, backend, meter);
        return;
    }
    tokio::spawn(async move {
        let (caller, backend) = match tokio::try_join!(caller, backend) {
            Ok(both) => both,
            Err(error) => {
                tracing::warn!(%error, "upgrade failed");
                return;
            }
        };
        let mut caller = TokioIo::new(caller);
        let mut backend = TokioIo::new(backend);
        if let Err(error) = tokio::io::copy_bidirectional(&mut caller, &mut backend).await {
            tracing::debug!(%error, "upgraded connection ended");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(version: Version, hosts: &[&str]) -> Request<()> {
        let mut request = Request::builder().version(version).uri("/openai/models");
        for host in hosts {
            request = request.header(HOST, *host);
        }
        request.body(()).unwrap()
    }

    /// A header map holding `pairs`, in order (a name may repeat).
    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn http11_needs_exactly_one_valid_host() {
        assert!(has_valid_host(&request(Version::HTTP_11, &["gw"])));
        assert!(has_valid_host(&request(Version::HTTP_11, &["gw:8080"])));
        assert!(has_valid_host(&request(Version::HTTP_11, &["[::1]:8080"])));
        for hosts in [&[][..], &["a", "b"], &["a b"], &[""], &["u@gw"], &["gw/x"]] {
            assert!(
                !has_valid_host(&request(Version::HTTP_11, hosts)),
                "{hosts:?}"
            );
        }
        assert!(has_valid_host(&request(Version::HTTP_2, &[])));
        assert!(has_valid_host(&request(Version::HTTP_10, &[])));
    }

    #[test]
    fn the_callers_api_key_leaves_the_query_and_nothing_else_does() {
        let strip =
            |uri: &str| without_api_key_in_query(&uri.parse().unwrap()).map(|u| u.to_string());
        assert_eq!(
            strip("/openai/realtime?api-version=2025-04-01&api-key=s3cret&deployment=rt")
                .as_deref(),
            Some("/openai/realtime?api-version=2025-04-01&deployment=rt")
        );
        assert_eq!(strip("/x?API-KEY=a&api%2Dkey=b").as_deref(), Some("/x"));
        assert_eq!(strip("/x?api-version=1&api-keys=kept"), None);
        assert_eq!(strip("/x"), None);
    }

    #[test]
    fn the_instance_is_offered_no_extension_and_no_key_subprotocol() {
        let prepared = |pairs: &[(&'static str, &'static str)]| {
            let mut headers = headers(pairs);
            prepare_request(&mut headers);
            headers
        };
        let headers = prepared(&[
            (
                "sec-websocket-extensions",
                "permessage-deflate; client_max_window_bits",
            ),
            (
                "sec-websocket-protocol",
                "realtime, openai-insecure-api-key.sk-caller, openai-beta.realtime-v1",
            ),
        ]);
        assert!(headers.get(SEC_WEBSOCKET_EXTENSIONS).is_none());
        assert_eq!(
            headers[SEC_WEBSOCKET_PROTOCOL],
            "realtime, openai-beta.realtime-v1"
        );
        let headers = prepared(&[
            (
                "sec-websocket-protocol",
                "openai-insecure-api-key.sk-caller",
            ),
            ("sec-websocket-protocol", "realtime"),
        ]);
        assert_eq!(
            headers
                .get_all(SEC_WEBSOCKET_PROTOCOL)
                .iter()
                .collect::<Vec<_>>(),
            ["realtime"]
        );
        let headers = prepared(&[("sec-websocket-protocol", "openai-insecure-api-key.sk")]);
        assert!(headers.get(SEC_WEBSOCKET_PROTOCOL).is_none());
        let headers = prepared(&[("sec-websocket-protocol", "realtime, chat")]);
        assert_eq!(headers[SEC_WEBSOCKET_PROTOCOL], "realtime, chat");
    }

    #[test]
    fn an_upgrade_needs_the_connection_token_and_the_upgrade_field() {
        assert!(is_requested(&headers(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket")
        ])));
        assert!(is_requested(&headers(&[
            ("connection", "keep-alive, upgrade"),
            ("upgrade", "websocket")
        ])));
        assert!(!is_requested(&headers(&[("upgrade", "websocket")])));
        assert!(!is_requested(&headers(&[("connection", "upgrade")])));
    }
}
