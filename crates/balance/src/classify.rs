//! The one classification of an attempt's outcome, shared by [`Balance`](crate::Balance) (passive
//! health) and the retry policy, so the two never disagree.

use std::error::Error as StdError;
use std::io;
use std::time::{Duration, SystemTime};

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
    /// A backend's second 401 in a row takes it out of rotation for
    /// [`HealthPolicy::credential_cooldown`](crate::HealthPolicy::credential_cooldown).
    Unauthorized,
    /// The backend refused us access (403: a missing role assignment, a network rule, a token
    /// for another tenant): the backend is out of rotation for
    /// [`HealthPolicy::credential_cooldown`](crate::HealthPolicy::credential_cooldown) at once.
    /// Not [`is_retryable`](Outcome::is_retryable) (the same backend would refuse again) but
    /// [`is_retryable_elsewhere`](Outcome::is_retryable_elsewhere): a retry policy may send the
    /// request to a backend not tried yet; when none takes it, the caller sees the 403.
    Forbidden,
    /// An answer that is the caller's to see (400 content_filter, 404, 422, ...) or an error the
    /// stack made about the request itself. Never retried; says nothing about backend health.
    Final,
    /// No credential could be had for the backend (its token endpoint is down): the backend was
    /// never contacted. Says nothing about its health (no cooldown, no failure counted, a trial
    /// stays to be sent). [`AzureOpenAiClassifier`] never gives it (it cannot know the
    /// credential error's type): a classifier that knows them does, as the `aoai-tower`
    /// gateway's.
    CredentialUnavailable {
        /// Whether another backend may authenticate another way, so that a retry on a backend
        /// not tried yet may help.
        retry_elsewhere: bool,
    },
    /// The backend does not hold what the request names (a response, a file, a thread created
    /// on another instance): another backend may. Says nothing about its health. Not
    /// [`is_retryable`](Outcome::is_retryable) but
    /// [`is_retryable_elsewhere`](Outcome::is_retryable_elsewhere): a retry policy asks the
    /// backends not tried yet; when none holds it, the caller sees this answer.
    /// [`AzureOpenAiClassifier`] never gives it (a 404 alone does not say the object is
    /// elsewhere); a classifier that knows the request looks for its object does, as the
    /// `aoai-tower` gateway's.
    NotHere,
}

impl Outcome {
    /// Whether a retry on another backend may give a different answer.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Outcome::Throttled { .. }
                | Outcome::Failed(_)
                | Outcome::Unauthorized
                | Outcome::CredentialUnavailable {
                    retry_elsewhere: true
                }
        )
    }

    /// Whether a retry on a backend not tried yet may give a different answer: every
    /// [`is_retryable`](Outcome::is_retryable) outcome, [`Outcome::Forbidden`] and
    /// [`Outcome::NotHere`], which the backend that gave them would give again, not another
    /// backend.
    pub fn is_retryable_elsewhere(&self) -> bool {
        self.is_retryable() || matches!(self, Outcome::Forbidden | Outcome::NotHere)
    }

    /// A short name for logs: `success`, `throttled`, `connect`, `timeout`, `status`, `error`,
    /// `unauthorized`, `forbidden`, `final`, `credential` or `not_here`.
    pub fn reason(&self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Throttled { .. } => "throttled",
            Outcome::Failed(Failure::Connect) => "connect",
            Outcome::Failed(Failure::Timeout) => "timeout",
            Outcome::Failed(Failure::Status(_)) => "status",
            Outcome::Failed(Failure::Other) => "error",
            Outcome::Unauthorized => "unauthorized",
            Outcome::Forbidden => "forbidden",
            Outcome::Final => "final",
            Outcome::CredentialUnavailable { .. } => "credential",
            Outcome::NotHere => "not_here",
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

    /// Classifies a whole response head: by default its status and headers
    /// ([`classify_response`](Self::classify_response)); override it to read what a layer below
    /// marked in its extensions. `Balance` and the retry policy call this one.
    fn classify_answer<B>(&self, response: &http::Response<B>) -> Outcome {
        self.classify_response(response.status(), response.headers())
    }
}

/// Azure OpenAI's rules: 429 is throttling; 408, 500, 502, 503, 504, connect errors and attempt
/// timeouts are failures; 401 is [`Outcome::Unauthorized`], 403 [`Outcome::Forbidden`]; every
/// other 4xx is final.
///
/// An error is read by its source chain, outermost first; the first error of a known kind
/// decides:
///
/// - tower's [`Elapsed`](tower::timeout::error::Elapsed) (an attempt timeout):
///   [`Failure::Timeout`];
/// - a [`hyper_util::client::legacy::Error`]: [`Failure::Connect`] when
///   [`is_connect`](hyper_util::client::legacy::Error::is_connect), else [`Failure::Other`];
/// - a [`hyper::Error`]: [`Failure::Timeout`] when [`is_timeout`](hyper::Error::is_timeout),
///   else [`Failure::Other`];
/// - a [`std::io::Error`]: [`Failure::Connect`] for the kinds `ConnectionRefused`,
///   `HostUnreachable`, `NetworkUnreachable` and `AddrNotAvailable`, [`Failure::Timeout`] for
///   `TimedOut`, [`Failure::Other`] for any other kind.
///
/// Any other error was made by the stack about the request itself (a refused path, a token
/// that could not be had) and is [`Outcome::Final`]. So the errors of any client built on
/// hyper, or on tokio's sockets, are classified right, not only those of this workspace's.
#[derive(Debug, Clone, Copy, Default)]
pub struct AzureOpenAiClassifier;

impl Classify for AzureOpenAiClassifier {
    fn classify_response(&self, status: StatusCode, headers: &HeaderMap) -> Outcome {
        match status.as_u16() {
            429 => Outcome::Throttled {
                retry_after: retry_after(headers, SystemTime::now()),
            },
            401 => Outcome::Unauthorized,
            403 => Outcome::Forbidden,
            408 | 500 | 502 | 503 | 504 => Outcome::Failed(Failure::Status(status)),
            400..=599 => Outcome::Final,
            _ => Outcome::Success,
        }
    }

    fn classify_error(&self, error: &(dyn StdError + 'static)) -> Outcome {
        let mut current = Some(error);
        while let Some(err) = current {
            if let Some(failure) = failure_of(err) {
                return Outcome::Failed(failure);
            }
            current = err.source();
        }
        Outcome::Final
    }
}

/// The failure one error of the chain stands for, if it is of a kind [`AzureOpenAiClassifier`]
/// knows.
fn failure_of(error: &(dyn StdError + 'static)) -> Option<Failure> {
    if error.is::<tower::timeout::error::Elapsed>() {
        return Some(Failure::Timeout);
    }
    if let Some(error) = error.downcast_ref::<hyper_util::client::legacy::Error>() {
        return Some(if error.is_connect() {
            Failure::Connect
        } else {
            Failure::Other
        });
    }
    if let Some(error) = error.downcast_ref::<hyper::Error>() {
        return Some(if error.is_timeout() {
            Failure::Timeout
        } else {
            Failure::Other
        });
    }
    let error = error.downcast_ref::<io::Error>()?;
    Some(match error.kind() {
        io::ErrorKind::ConnectionRefused
        | io::ErrorKind::HostUnreachable
        | io::ErrorKind::NetworkUnreachable
        | io::ErrorKind::AddrNotAvailable => Failure::Connect,
        io::ErrorKind::TimedOut => Failure::Timeout,
        _ => Failure::Other,
    })
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
        assert_eq!(
            c.classify_response(StatusCode::FORBIDDEN, &none),
            Outcome::Forbidden
        );
        for code in [400, 404, 413, 422, 501] {
            let status = StatusCode::from_u16(code).unwrap();
            assert_eq!(c.classify_response(status, &none), Outcome::Final, "{code}");
        }
    }

    /// An error that only says what caused it, as a layer's own error would.
    #[derive(Debug)]
    struct Wrapped(Box<dyn StdError + Send + Sync>);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a layer failed")
        }
    }

    impl StdError for Wrapped {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&*self.0)
        }
    }

    fn classify(error: impl StdError + Send + Sync + 'static) -> Outcome {
        AzureOpenAiClassifier.classify_error(&error)
    }

    /// What hyper-util's client answers for a request to `http://{addr}/`.
    async fn legacy_client_error(addr: std::net::SocketAddr) -> hyper_util::client::legacy::Error {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Empty<bytes::Bytes>>();
        let request = http::Request::get(format!("http://{addr}/"))
            .body(http_body_util::Empty::new())
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), client.request(request))
            .await
            .expect("the client answers")
            .expect_err("nothing serves HTTP there")
    }

    #[tokio::test]
    async fn a_refused_connection_of_hyper_utils_client_is_a_connect_failure() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let error = legacy_client_error(addr).await;
        assert!(error.is_connect(), "{error:?}");
        assert_eq!(classify(error), Outcome::Failed(Failure::Connect));
    }

    #[tokio::test]
    async fn a_connection_closed_before_the_answer_is_another_failure() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            // Each connection is closed unanswered.
            loop {
                drop(listener.accept().await);
            }
        });

        let error = legacy_client_error(addr).await;
        assert!(!error.is_connect(), "{error:?}");
        assert_eq!(classify(error), Outcome::Failed(Failure::Other));

        // hyper's own connection, without hyper-util's client: a `hyper::Error`.
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, http_body_util::Empty<bytes::Bytes>>(io)
                .await
                .unwrap();
        tokio::spawn(connection);
        let request = http::Request::get("/")
            .header("host", "localhost")
            .body(http_body_util::Empty::new())
            .unwrap();
        let error = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
            .await
            .expect("the connection answers")
            .expect_err("the connection was closed");
        assert!(!error.is_timeout(), "{error:?}");
        assert_eq!(classify(error), Outcome::Failed(Failure::Other));
        server.abort();
    }

    #[tokio::test]
    async fn a_hyper_error_that_is_a_timeout_is_a_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // A caller that connects and never sends a request head.
        let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let serve = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(Duration::from_millis(50))
            .serve_connection(
                hyper_util::rt::TokioIo::new(stream),
                hyper::service::service_fn(|_| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<
                        bytes::Bytes,
                    >::new(
                    )))
                }),
            );
        let error = tokio::time::timeout(Duration::from_secs(10), serve)
            .await
            .expect("the header read timeout ends the connection")
            .expect_err("no request head arrived");
        assert!(error.is_timeout(), "{error:?}");
        assert_eq!(classify(error), Outcome::Failed(Failure::Timeout));
    }

    #[test]
    fn io_errors_are_classified_by_their_kind() {
        use io::ErrorKind::*;
        let cases = [
            (ConnectionRefused, Failure::Connect),
            (HostUnreachable, Failure::Connect),
            (NetworkUnreachable, Failure::Connect),
            (AddrNotAvailable, Failure::Connect),
            (TimedOut, Failure::Timeout),
            (ConnectionReset, Failure::Other),
            (ConnectionAborted, Failure::Other),
            (BrokenPipe, Failure::Other),
            (UnexpectedEof, Failure::Other),
        ];
        for (kind, failure) in cases {
            let error = io::Error::new(kind, "from the socket");
            assert_eq!(classify(error), Outcome::Failed(failure), "{kind:?}");
        }
    }

    #[test]
    fn an_attempt_timeout_is_a_timeout() {
        let elapsed = tower::timeout::error::Elapsed::new();
        assert_eq!(classify(elapsed), Outcome::Failed(Failure::Timeout));
    }

    #[test]
    fn an_error_of_no_known_kind_is_final() {
        assert_eq!(classify(std::fmt::Error), Outcome::Final);
        let refused: Box<dyn StdError + Send + Sync> = "request path is not allowed".into();
        assert_eq!(classify(Wrapped(refused)), Outcome::Final);
    }

    #[tokio::test]
    async fn an_error_is_classified_by_what_its_source_chain_holds() {
        let refused = io::Error::new(io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(
            classify(Wrapped(Box::new(refused))),
            Outcome::Failed(Failure::Connect)
        );
        let elapsed = Wrapped(Box::new(tower::timeout::error::Elapsed::new()));
        assert_eq!(
            classify(Wrapped(Box::new(elapsed))),
            Outcome::Failed(Failure::Timeout)
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let connect = legacy_client_error(addr).await;
        let backend = crate::BackendError::new(
            crate::ServedBy::new("east".into(), 0),
            Box::new(Wrapped(Box::new(connect))),
        );
        assert_eq!(classify(backend), Outcome::Failed(Failure::Connect));
        // The outermost known kind decides: a timed-out I/O error that wraps a reset.
        let reset = io::Error::new(io::ErrorKind::ConnectionReset, "reset");
        let timed_out = io::Error::new(io::ErrorKind::TimedOut, Wrapped(Box::new(reset)));
        assert_eq!(classify(timed_out), Outcome::Failed(Failure::Timeout));
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
