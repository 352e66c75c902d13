//! The one classification of an attempt's outcome, shared by [`Balance`](crate::Balance) (passive
//! health) and the retry policy, so the two never disagree.

use std::error::Error as StdError;
use std::time::{Duration, SystemTime};

use aoai_upstream::UpstreamError;
use http::{HeaderMap, StatusCode};

/// What one attempt against one backend amounted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A 1xx, 2xx or 3xx answer.
    Success,
    /// The backend is throttling (429). `retry_after` is what its headers asked for, if anything.
    Throttled {
        /// The wait the backend asked for, from `retry-after-ms`, `retry-after` or
        /// `x-ratelimit-reset-*`.
        retry_after: Option<Duration>,
    },
    /// The backend failed in a way another backend may not: worth a retry elsewhere.
    Failed(Failure),
    /// The backend refused our credentials (401): worth one retry once the token is refreshed.
    Unauthorized,
    /// An answer that is the caller's to see (400 content_filter, 403, 404, ...) or an error the
    /// stack made about the request itself. Never retried; says nothing about backend health.
    Final,
}

impl Outcome {
    /// Whether a retry on another backend may give a different answer.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Outcome::Throttled { .. } | Outcome::Failed(_) | Outcome::Unauthorized
        )
    }

    /// A short name for logs: `success`, `throttled`, `connect`, `timeout`, `status`, `error`,
    /// `unauthorized` or `final`.
    pub fn reason(&self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Throttled { .. } => "throttled",
            Outcome::Failed(Failure::Connect) => "connect",
            Outcome::Failed(Failure::Timeout) => "timeout",
            Outcome::Failed(Failure::Status(_)) => "status",
            Outcome::Failed(Failure::Other) => "error",
            Outcome::Unauthorized => "unauthorized",
            Outcome::Final => "final",
        }
    }
}

/// How a backend failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// It answered 408, 500, 502, 503 or 504.
    Status(StatusCode),
    /// The connection could not be established.
    Connect,
    /// No response headers arrived within the attempt timeout.
    Timeout,
    /// The exchange broke some other way (connection reset before the response headers).
    Other,
}

/// Decides the [`Outcome`] of an attempt, from its response head or its error.
///
/// [`AzureOpenAiClassifier`] is the default; implement this trait to replace it (for example to
/// treat a gateway-specific status as throttling). The same classifier must be given to
/// [`Balance`](crate::Balance) and to the retry policy.
pub trait Classify: Clone + Send + Sync + 'static {
    /// Classifies a response by its status and headers.
    fn classify_response(&self, status: StatusCode, headers: &HeaderMap) -> Outcome;

    /// Classifies an error returned instead of a response.
    fn classify_error(&self, error: &(dyn StdError + 'static)) -> Outcome;
}

/// Azure OpenAI's rules: 429 is throttling; 408, 500, 502, 503, 504, connect errors and attempt
/// timeouts are failures; 401 is [`Outcome::Unauthorized`]; every other 4xx is final.
///
/// An error is a failure when its source chain holds an [`aoai_upstream::UpstreamError`] that
/// says the exchange with the backend failed (a connect error when
/// [`is_connect`](aoai_upstream::UpstreamError::is_connect)), a
/// `tower::timeout::error::Elapsed` or a `std::io::Error`; any other error was made by the stack
/// about the request (a refused path, a failing request body, a missing token) and is final.
#[derive(Debug, Clone, Copy, Default)]
pub struct AzureOpenAiClassifier;

impl Classify for AzureOpenAiClassifier {
    fn classify_response(&self, status: StatusCode, headers: &HeaderMap) -> Outcome {
        match status.as_u16() {
            429 => Outcome::Throttled {
                retry_after: retry_after(headers, SystemTime::now()),
            },
            401 => Outcome::Unauthorized,
            408 | 500 | 502 | 503 | 504 => Outcome::Failed(Failure::Status(status)),
            400..=599 => Outcome::Final,
            _ => Outcome::Success,
        }
    }

    fn classify_error(&self, error: &(dyn StdError + 'static)) -> Outcome {
        let mut current = Some(error);
        while let Some(err) = current {
            if let Some(err) = err.downcast_ref::<UpstreamError>() {
                return match err {
                    UpstreamError::Connect(_) => Outcome::Failed(Failure::Connect),
                    UpstreamError::Request(_) | UpstreamError::Body(_) => {
                        Outcome::Failed(Failure::Other)
                    }
                    _ => Outcome::Final,
                };
            }
            if err.is::<tower::timeout::error::Elapsed>() {
                return Outcome::Failed(Failure::Timeout);
            }
            if err.is::<std::io::Error>() {
                return Outcome::Failed(Failure::Other);
            }
            current = err.source();
        }
        Outcome::Final
    }
}

/// The wait a throttling answer asks for, from, in order of preference: `retry-after-ms`
/// (milliseconds), `retry-after` (seconds or an HTTP-date), `x-ratelimit-reset-requests`,
/// `x-ratelimit-reset-tokens` (seconds, or durations like `1m30s` and `250ms`).
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = text("retry-after-ms")
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
    {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    if let Some(value) = text("retry-after") {
        if let Ok(secs) = value.parse::<u64>() {
            return Some(Duration::from_secs(secs));
        }
        if let Ok(date) = httpdate::parse_http_date(value) {
            return Some(date.duration_since(now).unwrap_or(Duration::ZERO));
        }
    }
    ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"]
        .into_iter()
        .find_map(|name| text(name).and_then(parse_reset_duration))
}

/// Parses `12`, `1.5`, `250ms`, `6s`, `1m30s` or `2h` into a duration.
fn parse_reset_duration(value: &str) -> Option<Duration> {
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = value;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|&i| i > 0)?;
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit_secs = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += Duration::from_secs_f64(number * unit_secs);
        rest = &rest[unit_len..];
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn statuses_are_classified_like_azure_openai() {
        let c = AzureOpenAiClassifier;
        let none = HeaderMap::new();
        assert_eq!(c.classify_response(StatusCode::OK, &none), Outcome::Success);
        assert_eq!(
            c.classify_response(StatusCode::TOO_MANY_REQUESTS, &none),
            Outcome::Throttled { retry_after: None }
        );
        assert_eq!(
            c.classify_response(StatusCode::UNAUTHORIZED, &none),
            Outcome::Unauthorized
        );
        for code in [408, 500, 502, 503, 504] {
            let status = StatusCode::from_u16(code).unwrap();
            assert_eq!(
                c.classify_response(status, &none),
                Outcome::Failed(Failure::Status(status)),
                "{code}"
            );
        }
        for code in [400, 403, 404, 413, 422, 501] {
            let status = StatusCode::from_u16(code).unwrap();
            assert_eq!(c.classify_response(status, &none), Outcome::Final, "{code}");
        }
    }

    #[test]
    fn errors_are_classified_by_their_source_chain() {
        let c = AzureOpenAiClassifier;
        let elapsed: Box<dyn StdError + Send + Sync> =
            Box::new(tower::timeout::error::Elapsed::new());
        assert_eq!(
            c.classify_error(&*elapsed),
            Outcome::Failed(Failure::Timeout)
        );
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert_eq!(c.classify_error(&io), Outcome::Failed(Failure::Other));
        let fmt = std::fmt::Error;
        assert_eq!(c.classify_error(&fmt), Outcome::Final);
    }

    #[test]
    fn retry_after_ms_is_preferred_over_retry_after() {
        let h = headers(&[("retry-after", "10"), ("retry-after-ms", "1500")]);
        assert_eq!(
            retry_after(&h, SystemTime::now()),
            Some(Duration::from_millis(1500))
        );
    }

    #[test]
    fn retry_after_accepts_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let h = headers(&[("retry-after", "7")]);
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(7)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        let h = headers(&[("retry-after", &date)]);
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(30)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        let h = headers(&[("retry-after", &past)]);
        assert_eq!(retry_after(&h, now), Some(Duration::ZERO));
    }

    #[test]
    fn ratelimit_reset_headers_are_the_fallback() {
        let now = SystemTime::now();
        let h = headers(&[("x-ratelimit-reset-requests", "1m30s")]);
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(90)));
        let h = headers(&[("x-ratelimit-reset-tokens", "250ms")]);
        assert_eq!(retry_after(&h, now), Some(Duration::from_millis(250)));
        let h = headers(&[("x-ratelimit-reset-tokens", "12")]);
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(12)));
        let h = headers(&[("retry-after", "soon"), ("x-ratelimit-reset-tokens", "5x")]);
        assert_eq!(retry_after(&h, now), None);
    }
}
