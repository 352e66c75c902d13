//! Which header fields travel end to end (RFC 9110, section 7.6.1), read from the raw names so
//! that both heads are filtered while they are written or parsed, without a pass of their own.

use http::header::{self, HeaderMap, HeaderName, InvalidHeaderName};

/// What a header field is to a proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FieldRole {
    /// Forwarded as it is.
    EndToEnd,
    /// `Host`: a request gets the backend's instead.
    Host,
    /// `Content-Length`: a request gets one matching the body sent; a response keeps its own.
    ContentLength,
    /// `Transfer-Encoding`: this connection's framing; never forwarded.
    TransferEncoding,
    /// `Connection`: this connection's options, and the names of more fields not to forward.
    Connection,
    /// `Keep-Alive`, `TE`, `Trailer`, `Upgrade` and every `Proxy-*` field
    /// (`Proxy-Authorization`, `Proxy-Authenticate`, `Proxy-Connection`, ...): never forwarded.
    HopByHop,
}

impl FieldRole {
    /// The role of the field named `name`, in any letter case. Almost every end-to-end name is
    /// told apart by its length and first letter alone.
    pub(crate) fn of(name: &[u8]) -> Self {
        let Some(first) = name.first() else {
            return Self::EndToEnd;
        };
        let is = |known: &str| is_lowercase_of(name, known.as_bytes());
        match (name.len(), first.to_ascii_lowercase()) {
            (4, b'h') if is("host") => Self::Host,
            (14, b'c') if is("content-length") => Self::ContentLength,
            (17, b't') if is("transfer-encoding") => Self::TransferEncoding,
            (10, b'c') if is("connection") => Self::Connection,
            (10, b'k') if is("keep-alive") => Self::HopByHop,
            (2, b't') if is("te") => Self::HopByHop,
            (7, b't') if is("trailer") => Self::HopByHop,
            (7, b'u') if is("upgrade") => Self::HopByHop,
            (6.., b'p') if is_lowercase_of(&name[..6], b"proxy-") => Self::HopByHop,
            _ => Self::EndToEnd,
        }
    }
}

// Fields of Azure OpenAI's answers (and of the servers in front of it) that `http` has no
// constant for.
const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");
const APIM_REQUEST_ID: HeaderName = HeaderName::from_static("apim-request-id");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_MS_REGION: HeaderName = HeaderName::from_static("x-ms-region");
const X_MS_CLIENT_REQUEST_ID: HeaderName = HeaderName::from_static("x-ms-client-request-id");
const X_MS_DEPLOYMENT_NAME: HeaderName = HeaderName::from_static("x-ms-deployment-name");
const X_MS_RAI_INVOKED: HeaderName = HeaderName::from_static("x-ms-rai-invoked");
const X_RATELIMIT_LIMIT_REQUESTS: HeaderName =
    HeaderName::from_static("x-ratelimit-limit-requests");
const X_RATELIMIT_LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
const X_RATELIMIT_REMAINING_REQUESTS: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-requests");
const X_RATELIMIT_REMAINING_TOKENS: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-tokens");
const X_RATELIMIT_RESET_REQUESTS: HeaderName =
    HeaderName::from_static("x-ratelimit-reset-requests");
const X_RATELIMIT_RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");
const AZUREML_MODEL_SESSION: HeaderName = HeaderName::from_static("azureml-model-session");
const CMP_UPSTREAM_RESPONSE_DURATION: HeaderName =
    HeaderName::from_static("cmp-upstream-response-duration");
const X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");
// Fields of the requests the OpenAI and Azure SDKs send.
const API_KEY: HeaderName = HeaderName::from_static("api-key");
const X_MS_USERAGENT: HeaderName = HeaderName::from_static("x-ms-useragent");
const X_STAINLESS_LANG: HeaderName = HeaderName::from_static("x-stainless-lang");
const X_STAINLESS_PACKAGE_VERSION: HeaderName =
    HeaderName::from_static("x-stainless-package-version");
const X_STAINLESS_OS: HeaderName = HeaderName::from_static("x-stainless-os");
const X_STAINLESS_ARCH: HeaderName = HeaderName::from_static("x-stainless-arch");
const X_STAINLESS_RUNTIME: HeaderName = HeaderName::from_static("x-stainless-runtime");
const X_STAINLESS_RUNTIME_VERSION: HeaderName =
    HeaderName::from_static("x-stainless-runtime-version");
const X_STAINLESS_ASYNC: HeaderName = HeaderName::from_static("x-stainless-async");
const X_STAINLESS_RETRY_COUNT: HeaderName = HeaderName::from_static("x-stainless-retry-count");
const X_STAINLESS_READ_TIMEOUT: HeaderName = HeaderName::from_static("x-stainless-read-timeout");

/// The name of a field, from its name as received (token characters only, as httparse checked
/// it), in any letter case. The fields Azure OpenAI and the servers in front of it answer with,
/// and those the OpenAI and Azure SDKs send, take a constant, without `HeaderName::from_bytes`
/// lowercasing and looking up the name (about a hundred instructions a field); any other name is
/// parsed.
pub(crate) fn field_name(name: &[u8]) -> Result<HeaderName, InvalidHeaderName> {
    let is = |known: &str| is_lowercase_of(name, known.as_bytes());
    let first = name.first().map_or(0, u8::to_ascii_lowercase);
    Ok(match (name.len(), first) {
        (14, b'c') if is(header::CONTENT_LENGTH.as_str()) => header::CONTENT_LENGTH,
        (12, b'c') if is(header::CONTENT_TYPE.as_str()) => header::CONTENT_TYPE,
        (16, b'c') if is(header::CONTENT_ENCODING.as_str()) => header::CONTENT_ENCODING,
        (13, b'c') if is(header::CACHE_CONTROL.as_str()) => header::CACHE_CONTROL,
        (4, b'd') if is(header::DATE.as_str()) => header::DATE,
        (6, b's') if is(header::SERVER.as_str()) => header::SERVER,
        (4, b'v') if is(header::VARY.as_str()) => header::VARY,
        (11, b'r') if is(header::RETRY_AFTER.as_str()) => header::RETRY_AFTER,
        (25, b's') if is(header::STRICT_TRANSPORT_SECURITY.as_str()) => {
            header::STRICT_TRANSPORT_SECURITY
        }
        (22, b'x') if is(header::X_CONTENT_TYPE_OPTIONS.as_str()) => header::X_CONTENT_TYPE_OPTIONS,
        (27, b'a') if is(header::ACCESS_CONTROL_ALLOW_ORIGIN.as_str()) => {
            header::ACCESS_CONTROL_ALLOW_ORIGIN
        }
        (14, b'r') if is(RETRY_AFTER_MS.as_str()) => RETRY_AFTER_MS,
        (15, b'a') if is(APIM_REQUEST_ID.as_str()) => APIM_REQUEST_ID,
        (12, b'x') if is(X_REQUEST_ID.as_str()) => X_REQUEST_ID,
        (11, b'x') if is(X_MS_REGION.as_str()) => X_MS_REGION,
        (22, b'x') if is(X_MS_CLIENT_REQUEST_ID.as_str()) => X_MS_CLIENT_REQUEST_ID,
        (20, b'x') if is(X_MS_DEPLOYMENT_NAME.as_str()) => X_MS_DEPLOYMENT_NAME,
        (16, b'x') if is(X_MS_RAI_INVOKED.as_str()) => X_MS_RAI_INVOKED,
        (26, b'x') if is(X_RATELIMIT_LIMIT_REQUESTS.as_str()) => X_RATELIMIT_LIMIT_REQUESTS,
        (24, b'x') if is(X_RATELIMIT_LIMIT_TOKENS.as_str()) => X_RATELIMIT_LIMIT_TOKENS,
        (30, b'x') if is(X_RATELIMIT_REMAINING_REQUESTS.as_str()) => X_RATELIMIT_REMAINING_REQUESTS,
        (28, b'x') if is(X_RATELIMIT_REMAINING_TOKENS.as_str()) => X_RATELIMIT_REMAINING_TOKENS,
        (26, b'x') if is(X_RATELIMIT_RESET_REQUESTS.as_str()) => X_RATELIMIT_RESET_REQUESTS,
        (24, b'x') if is(X_RATELIMIT_RESET_TOKENS.as_str()) => X_RATELIMIT_RESET_TOKENS,
        (21, b'a') if is(AZUREML_MODEL_SESSION.as_str()) => AZUREML_MODEL_SESSION,
        (30, b'c') if is(CMP_UPSTREAM_RESPONSE_DURATION.as_str()) => CMP_UPSTREAM_RESPONSE_DURATION,
        (17, b'x') if is(X_ACCEL_BUFFERING.as_str()) => X_ACCEL_BUFFERING,
        (4, b'h') if is(header::HOST.as_str()) => header::HOST,
        (10, b'u') if is(header::USER_AGENT.as_str()) => header::USER_AGENT,
        (6, b'a') if is(header::ACCEPT.as_str()) => header::ACCEPT,
        (15, b'a') if is(header::ACCEPT_ENCODING.as_str()) => header::ACCEPT_ENCODING,
        (13, b'a') if is(header::AUTHORIZATION.as_str()) => header::AUTHORIZATION,
        (10, b'c') if is(header::CONNECTION.as_str()) => header::CONNECTION,
        (6, b'e') if is(header::EXPECT.as_str()) => header::EXPECT,
        (7, b'a') if is(API_KEY.as_str()) => API_KEY,
        (14, b'x') if is(X_MS_USERAGENT.as_str()) => X_MS_USERAGENT,
        (16, b'x') if is(X_STAINLESS_LANG.as_str()) => X_STAINLESS_LANG,
        (27, b'x') if is(X_STAINLESS_PACKAGE_VERSION.as_str()) => X_STAINLESS_PACKAGE_VERSION,
        (15, b'x') if is(X_STAINLESS_OS.as_str()) => X_STAINLESS_OS,
        (16, b'x') if is(X_STAINLESS_ARCH.as_str()) => X_STAINLESS_ARCH,
        (19, b'x') if is(X_STAINLESS_RUNTIME.as_str()) => X_STAINLESS_RUNTIME,
        (27, b'x') if is(X_STAINLESS_RUNTIME_VERSION.as_str()) => X_STAINLESS_RUNTIME_VERSION,
        (17, b'x') if is(X_STAINLESS_ASYNC.as_str()) => X_STAINLESS_ASYNC,
        (23, b'x') if is(X_STAINLESS_RETRY_COUNT.as_str()) => X_STAINLESS_RETRY_COUNT,
        (24, b'x') if is(X_STAINLESS_READ_TIMEOUT.as_str()) => X_STAINLESS_READ_TIMEOUT,
        _ => return HeaderName::from_bytes(name),
    })
}

/// Whether `name`, a field name (token characters only), is `known` (lowercase letters and `-`)
/// in any letter case. Setting bit 5 lowercases a letter and leaves `-` alone; of the token
/// characters, only letters become lowercase letters that way, and only `-` stays `-`.
fn is_lowercase_of(name: &[u8], known: &[u8]) -> bool {
    name.len() == known.len() && name.iter().zip(known).all(|(&a, &b)| a | 0x20 == b)
}

/// The options of a `Connection` value: its comma-separated tokens, trimmed.
pub(crate) fn connection_options(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Whether a `Connection` option names a field (a proxy drops it; the server sends it with its
/// answer's field), rather than being `close` or `keep-alive`.
pub(crate) fn names_a_field(option: &[u8]) -> bool {
    !option.eq_ignore_ascii_case(b"close") && !option.eq_ignore_ascii_case(b"keep-alive")
}

/// The fields a request's `Connection` names, which are not forwarded either; `None`, and no
/// allocation, when it names none, as usual.
pub(crate) fn connection_named(headers: &HeaderMap) -> Option<Vec<HeaderName>> {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|value| connection_options(value.as_bytes()))
        .filter(|option| names_a_field(option))
        .filter_map(|option| HeaderName::from_bytes(option).ok())
        .collect();
    (!named.is_empty()).then_some(named)
}

/// Whether a request field is written to the backend as it is: end to end, and not named by the
/// request's `Connection` (`named`, from [`connection_named`]).
pub(crate) fn is_forwarded_request_field(name: &HeaderName, named: Option<&[HeaderName]>) -> bool {
    FieldRole::of(name.as_str().as_bytes()) == FieldRole::EndToEnd
        && named.is_none_or(|named| !named.contains(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_of_hop_by_hop_and_framing_fields_in_any_case() {
        for (name, role) in [
            ("Host", FieldRole::Host),
            ("content-length", FieldRole::ContentLength),
            ("Transfer-Encoding", FieldRole::TransferEncoding),
            ("CONNECTION", FieldRole::Connection),
            ("keep-alive", FieldRole::HopByHop),
            ("TE", FieldRole::HopByHop),
            ("trailer", FieldRole::HopByHop),
            ("Upgrade", FieldRole::HopByHop),
            ("proxy-authorization", FieldRole::HopByHop),
            ("Proxy-Connection", FieldRole::HopByHop),
            ("proxy-anything", FieldRole::HopByHop),
            ("proxy-", FieldRole::HopByHop),
        ] {
            assert_eq!(FieldRole::of(name.as_bytes()), role, "{name}");
        }
    }

    #[test]
    fn end_to_end_fields_pass() {
        for name in [
            "content-type",
            "authorization",
            "user-agent",
            "x-proxy-note",
            "proxy",
            "hosts",
            "tea",
            "keep-alivex",
            "content-lengthy",
            "x-ms-region",
            "",
        ] {
            assert_eq!(
                FieldRole::of(name.as_bytes()),
                FieldRole::EndToEnd,
                "{name}"
            );
        }
    }

    #[test]
    fn field_names_are_lowercase_whatever_case_they_came_in() {
        for name in [
            "Content-Type",
            "content-length",
            "DATE",
            "X-RateLimit-Remaining-Tokens",
            "apim-request-id",
            "Cmp-Upstream-Response-Duration",
            "x-custom-field",
            "X-Ms-Regions",
            "Host",
            "Accept-Encoding",
            "API-Key",
            "X-Stainless-Arch",
            "x-stainless-runtime-version",
            "X-Stainless-Package-Version",
            "x-stainless-os",
            "X-MS-UserAgent",
            "Expect",
        ] {
            let parsed = field_name(name.as_bytes()).unwrap();
            assert_eq!(parsed, name.to_ascii_lowercase().as_str(), "{name}");
        }
        assert!(field_name(b"bad name").is_err());
        assert!(field_name(b"").is_err());
    }

    #[test]
    fn connection_names_fields_besides_its_options() {
        let mut headers = HeaderMap::new();
        assert_eq!(connection_named(&headers), None);
        headers.append(header::CONNECTION, "keep-alive, Close".parse().unwrap());
        assert_eq!(connection_named(&headers), None);
        headers.append(
            header::CONNECTION,
            " X-Foo ,,x-bar, bad name".parse().unwrap(),
        );
        let named = connection_named(&headers).unwrap();
        assert_eq!(named, ["x-foo", "x-bar"]);
        assert!(!is_forwarded_request_field(
            &HeaderName::from_static("x-foo"),
            Some(&named)
        ));
        assert!(is_forwarded_request_field(
            &HeaderName::from_static("x-keep"),
            Some(&named)
        ));
    }
}
